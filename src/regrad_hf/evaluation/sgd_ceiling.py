"""A diagnostic ceiling for one retrieved step: a few plain SGD steps on the retrieved documents, no meta-learning.

ReGrad takes one step from a meta-learned start with learned step sizes. This method takes `steps` steps of plain
gradient descent from the untrained LoRA start (peft's init: B = 0, the same tensors ReGrad steps on) on the
retrieved documents' mean LM loss, the loss the bank's gradients are taken of. It tells what the LoRA tensors can
carry from these documents with more than one step and no meta-learning: if this ceiling is low, a better learner
of one step cannot be expected to reach RAG either; if it is high, the gap is the learner's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import ReGradValueError


@dataclass
class SGDCeilingConfig:
    """Settings of the `sgd` method.

    Args:
        steps (`int`): plain gradient steps on the retrieved documents (the issue's ceiling: 5).
        learning_rate (`float`): the step size of every LoRA tensor; each step moves the tensors by
            `-learning_rate * mean over documents of their gradients`.
    """

    steps: int = 5
    learning_rate: float = 3.0

    def __post_init__(self):
        if self.steps < 1 or not self.learning_rate > 0:
            raise ReGradValueError(
                f"the sgd method needs steps >= 1 and learning_rate > 0, got {self.steps}, {self.learning_rate}"
            )


def sgd_state(
    model, start: Mapping[str, torch.Tensor], documents: Sequence[str], config: SGDCeilingConfig
) -> dict[str, torch.Tensor]:
    """The learner state after `config.steps` plain gradient steps from `start` on the mean LM loss of `documents`.

    Args:
        model ([`ReGradForCausalLM`]): the model whose LoRA tensors are stepped; left as it was.
        start (`Mapping[str, torch.Tensor]`): the learner state to start from (e.g. [`untrained_learner_state`]).
        documents (`Sequence[str]`): the texts to train on.
        config ([`SGDCeilingConfig`]): steps and learning rate.

    Returns:
        `dict[str, torch.Tensor]`: `start` with its LoRA tensors stepped (the step sizes entry unchanged).
    """
    state = {name: tensor.clone() for name, tensor in start.items()}
    for _ in range(config.steps):
        with model.swapped_learner(state):
            # One gradient per document, stacked on a first axis; the mean is the gradient of the mean loss.
            gradients = model.document_gradients(list(documents))
        for name, stacked in gradients.items():
            state[name] = state[name] - config.learning_rate * stacked.mean(dim=0).to(state[name].dtype)
    return state


@contextmanager
def sgd_adapted(
    model, start: Mapping[str, torch.Tensor], documents: Sequence[str], config: SGDCeilingConfig
) -> Iterator[None]:
    """Runs the block with the LoRA tensors after [`sgd_state`]; the learner is restored bit for bit after."""
    with model.swapped_learner(sgd_state(model, start, documents, config)):
        yield

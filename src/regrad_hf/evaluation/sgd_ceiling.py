"""A diagnostic ceiling for one retrieved step: a few plain SGD steps on the retrieved documents, no meta-learning.

ReGrad takes one step from a meta-learned start with learned step sizes. This method takes `steps` steps of plain
gradient descent from the untrained LoRA start (peft's init: B = 0, the same tensors ReGrad steps on) on the
retrieved documents' mean LM loss, the loss the bank's gradients are taken of. It tells what the LoRA tensors can
carry from these documents with more than one step and no meta-learning: if this ceiling is low, a better learner
of one step cannot be expected to reach RAG either; if it is high, the gap is the learner's.

A ceiling must not diverge: a step that raises the documents' loss is taken again at half the step size (backtracking,
the halved size kept for the later steps). Without it, SmolLM2-135M's rank-16 LoRA start went from a mean document
loss of 3.39 to 29 after 5 steps of size 1 on SQuAD dev documents, and to 245 at size 3 (the first default), while
size 0.5 lowered it to 3.23: no fixed size is safe for every model and document.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..adaptation.deltas import documents_lm_loss, tokenize_documents
from ..errors import ReGradValueError


@dataclass
class SGDCeilingConfig:
    """Settings of the `sgd` method.

    Args:
        steps (`int`): plain gradient steps on the retrieved documents (the issue's ceiling: 5).
        learning_rate (`float`): the first step size of every LoRA tensor; a step moves the tensors by
            `-step size * mean over documents of their gradients`.
        max_halvings (`int`): how often one step may halve the step size to lower the documents' loss; a step that
            still raises it after that ends the descent where it stands.
    """

    steps: int = 5
    learning_rate: float = 1.0
    max_halvings: int = 8

    def __post_init__(self):
        if self.steps < 1 or not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise ReGradValueError(
                f"the sgd method needs steps >= 1 and a finite learning_rate > 0, got {self.steps}, "
                f"{self.learning_rate}"
            )
        if self.max_halvings < 0:
            raise ReGradValueError(f"max_halvings must be >= 0, got {self.max_halvings}")


def documents_loss(model, documents: Sequence[str]) -> float:
    """The documents' mean LM loss under the model's current LoRA tensors (each document's mean token NLL, averaged):
    the loss whose gradients the bank stores and the sgd steps descend."""
    language_model, total = model.language_model, 0.0
    was_training = language_model.training
    language_model.eval()  # no dropout, as for the gradients
    try:
        with torch.no_grad():
            for ids in tokenize_documents(model.tokenizer, documents, model.config.max_document_tokens):
                input_ids = torch.tensor([ids], device=model.device)
                total += documents_lm_loss(language_model, input_ids, torch.ones_like(input_ids)).item()
    finally:
        language_model.train(was_training)
    return total / len(documents)


def sgd_state(
    model, start: Mapping[str, torch.Tensor], documents: Sequence[str], config: SGDCeilingConfig
) -> dict[str, torch.Tensor]:
    """The learner state after `config.steps` plain gradient steps from `start` on the mean LM loss of `documents`,
    each step halving the step size until it lowers that loss (see the module docstring).

    Args:
        model ([`ReGradForCausalLM`]): the model whose LoRA tensors are stepped; left as it was.
        start (`Mapping[str, torch.Tensor]`): the learner state to start from (e.g. [`untrained_learner_state`]).
        documents (`Sequence[str]`): the texts to train on.
        config ([`SGDCeilingConfig`]): steps, first step size and halvings.

    Returns:
        `dict[str, torch.Tensor]`: `start` with its LoRA tensors stepped (the step sizes entry unchanged).
    """
    documents = list(documents)
    state = {name: tensor.clone() for name, tensor in start.items()}
    with model.swapped_learner(state):
        loss = documents_loss(model, documents)
    step_size = config.learning_rate
    for _ in range(config.steps):
        with model.swapped_learner(state):
            # One gradient per document, stacked on a first axis; the mean is the gradient of the mean loss.
            gradients = {name: stacked.mean(dim=0) for name, stacked in model.document_gradients(documents).items()}
        for _ in range(config.max_halvings + 1):
            stepped = dict(state)
            for name, gradient in gradients.items():
                stepped[name] = state[name] - step_size * gradient.to(state[name].dtype)
            with model.swapped_learner(stepped):
                stepped_loss = documents_loss(model, documents)
            if stepped_loss <= loss:
                break
            step_size /= 2
        else:
            return state  # no step size tried lowers the loss: the descent ends here
        state, loss = stepped, stepped_loss
    return state


@contextmanager
def sgd_adapted(
    model, start: Mapping[str, torch.Tensor], documents: Sequence[str], config: SGDCeilingConfig
) -> Iterator[None]:
    """Runs the block with the LoRA tensors after [`sgd_state`]; the learner is restored bit for bit after."""
    with model.swapped_learner(sgd_state(model, start, documents, config)):
        yield

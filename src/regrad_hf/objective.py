"""The bi-level ReGrad meta-objective of one batch of encoded tasks (see [`TaskCollator`] for the encoding).

For each task (documents D, question q, answer a):

- inner: `g = d/d theta sum_{d in D} NLL(d)` (the per-document mean token NLL, as stored in a bank), with
  `create_graph=True` (second order) or detached (first order);
- adapt: `theta' = theta - gamma * alpha * g`;
- outer: cross-entropy of the answer tokens of `a` given the prompt, through `torch.func.functional_call` with
  `theta'`.

[`ReGradForCausalLM.forward`] computes it when given `meta_tasks`, so that a wrapper around the model (DDP) sees a
forward pass and synchronises the gradients of the backward that follows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .deltas import adapted_parameters, documents_lm_loss


def task_loss(learner, task: Mapping[str, torch.Tensor], first_order: bool = False) -> torch.Tensor:
    """The outer (answer) loss of one encoded task after one inner step on its documents.

    Args:
        learner ([`ReGradForCausalLM`]): the learner (its LoRA tensors are theta, its step sizes alpha).
        task (`Mapping[str, torch.Tensor]`): `document_ids`, `document_mask`, `input_ids`, `labels`.
        first_order (`bool`, defaults to `False`): detach the inner gradient.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    lora = learner.lora_parameters()
    second_order = not first_order and torch.is_grad_enabled()
    # Double backward through CPU flash SDPA is not implemented; the math kernel supports it.
    with sdpa_kernel(SDPBackend.MATH):
        inner = documents_lm_loss(learner.language_model, task["document_ids"], task["document_mask"])
        gradients = torch.autograd.grad(inner, list(lora.values()), create_graph=second_order, allow_unused=True)
        summed = {
            name: torch.zeros_like(p) if g is None else g if second_order else g.detach()
            for (name, p), g in zip(lora.items(), gradients, strict=True)
        }
        adapted = adapted_parameters(lora, summed, learner.step_sizes(), learner.config.gamma)
        outputs = functional_call(
            learner.language_model,
            adapted,
            args=(),
            kwargs={"input_ids": task["input_ids"], "labels": task["labels"]},
        )
    return outputs.loss


def meta_loss(learner, tasks: Sequence[Mapping[str, torch.Tensor]], first_order: bool = False) -> torch.Tensor:
    """Mean of [`task_loss`] over `tasks`."""
    return torch.stack([task_loss(learner, task, first_order) for task in tasks]).mean()

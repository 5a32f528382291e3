"""Distillation from a RAG teacher: a denser outer signal for meta-training.

The gold answer alone scores a handful of tokens per question, one-hot. The same base model reading the documents
(RAG, the documents in the prompt, LoRA off) puts a whole distribution on each answer token: which words it
would have said, and how sure it is. Distillation adds to the outer loss the KL divergence of the adapted model's
next-token distribution (question only, after the step) from the teacher's (documents and question, no step), at
every answer position, the first one included. The teacher runs without a graph and on the fly: a group's
questions share the documents at the start of their prompts, so that prefix is run once for all of them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..kv_cache import cache_keyword, returned_cache


def base_parameters(lora: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors with every B set to zero: through `functional_call`, exactly the base model (each LoRA
    layer adds exactly 0), without touching the model's own tensors."""
    return {name: torch.zeros_like(p) if ".lora_B." in name else p.detach() for name, p in lora.items()}


def scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The `(rows, positions)` whose logits predict a labelled token: position `t` predicts token `t + 1`.

    Args:
        labels (`torch.Tensor`): `(batch, length)`, -100 where not scored.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: row and position indices, in row-major order.
    """
    return (labels[:, 1:] != -100).nonzero(as_tuple=True)


def shared_prefix_length(input_ids: torch.Tensor, labels: torch.Tensor) -> int:
    """How many leading tokens every row shares, capped so that every row's first scored logit lies after them."""
    if len(input_ids) == 1:
        shared = input_ids.shape[1]
    else:
        differs = (input_ids != input_ids[:1]).any(0)
        shared = int(differs.int().argmax()) if differs.any() else input_ids.shape[1]
    first_label = (labels != -100).int().argmax(-1)  # the first answer token of each row
    return max(0, min(shared, int(first_label.min()) - 1))


@torch.no_grad()
def teacher_log_probs(model, parameters: Mapping[str, torch.Tensor], input_ids: torch.Tensor, labels: torch.Tensor):
    """The teacher's log-probabilities at the answer positions of `labels`, in [`scored_positions`] order.

    The rows' shared prefix (the documents) runs once, its key/value cache is repeated for every row, and only the
    rows' remainders (question and answer) run on top. Rows are right-padded, so a real token never sees padding.

    Args:
        model (`torch.nn.Module`): the causal language model.
        parameters (`Mapping[str, torch.Tensor]`): tensors to run it with (`functional_call`), e.g.
            [`base_parameters`].
        input_ids (`torch.Tensor`): `(batch, length)` teacher prompts and answers.
        labels (`torch.Tensor`): `(batch, length)`, -100 except on the answer tokens.

    Returns:
        `torch.Tensor`: `(scored tokens, vocabulary)` float32 log-probabilities.
    """
    prefix = shared_prefix_length(input_ids, labels)
    kwargs = {"input_ids": input_ids}
    if prefix > 0:
        prefix_kwargs = {"input_ids": input_ids[:1, :prefix], "use_cache": True, "logits_to_keep": 1}
        outputs = functional_call(model, dict(parameters), args=(), kwargs=prefix_kwargs)
        cache = returned_cache(outputs)
        cache.batch_repeat_interleave(len(input_ids))
        kwargs = {"input_ids": input_ids[:, prefix:], cache_keyword(model): cache, "use_cache": True}
    logits = functional_call(model, dict(parameters), args=(), kwargs=kwargs).logits
    rows, positions = scored_positions(labels)
    return logits[rows, positions - prefix].float().log_softmax(-1)


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the answer tokens of KL(teacher || student) of the next-token distributions.

    Args:
        student_logits (`torch.Tensor`): `(batch, length, vocabulary)` logits of the student's rows.
        labels (`torch.Tensor`): the student's labels, -100 except on the answer tokens (the same answer tokens, in
            the same order, as the teacher's).
        teacher (`torch.Tensor`): [`teacher_log_probs`] of the teacher's rows.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    rows, positions = scored_positions(labels)
    student = student_logits[rows, positions].float().log_softmax(-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()

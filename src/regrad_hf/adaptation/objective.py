"""The bi-level ReGrad meta-objective of one batch of encoded tasks (see [`TaskCollator`] for the encoding).

For each task (documents D, question q, answer a):

- inner: `g = d/d theta sum_{d in D} NLL(d)` (the per-document mean token NLL, as stored in a bank), with
  `create_graph=True` (second order) or detached (first order);
- adapt: `theta' = theta - gamma * alpha * T(g)` (`T` the learner's gradient transform, when it has one: trained
  here with the step sizes, also against cached gradients);
- outer: cross-entropy of the answer tokens of `a` given the prompt, through `torch.func.functional_call` with
  `theta'`; with `first_token_weight` w != 1, a weighted mean in which the answer's first token counts w times.
  Greedy decoding commits to an answer with its first token, and in a plain mean that token is one of five or
  more (`benchmarks/bench_answer_tokens.py`: the shipped learner's step lowers the other answer tokens' NLL by
  1.2 nats on SQuAD dev and the first token's by 0.26);
- locality (optional, `locality_weight > 0`): plus `locality_weight` times the KL divergence, per token, of the
  unadapted model's next-token distribution to the adapted one's, on another task's prompt and answer: text the
  injected documents say nothing about, which the step should leave alone (the locality term of knowledge-editing
  work). It penalises steps that make the model degenerate everywhere ("village village village");
- distillation (optional, `distillation_weight > 0`): plus `distillation_weight` times the KL divergence of the
  adapted model's next-token distribution from a RAG teacher's (the base model reading the documents) at every
  answer position (see [`regrad_hf.adaptation.distillation`]): a whole distribution per answer token instead of one gold
  token.

[`ReGradForCausalLM.forward`] computes it when given `meta_tasks`, so that a wrapper around the model (DDP) sees a
forward pass and synchronises the gradients of the backward that follows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import ReGradValueError
from .deltas import adapted_parameters, documents_lm_loss
from .distillation import base_parameters, distillation_loss, teacher_log_probs


def check_first_token_weight(weight: float) -> None:
    """Raises [`ReGradValueError`] unless `weight` is a finite number above 0."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
        raise ReGradValueError(f"first_token_weight must be a finite number above 0, got {weight!r}")


def check_distillation_weight(weight: float) -> None:
    """Raises [`ReGradValueError`] unless `weight` is a finite number of at least 0."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise ReGradValueError(f"distillation_weight must be a finite number >= 0, got {weight!r}")


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, first_token_weight: float = 1.0) -> torch.Tensor:
    """Next-token cross-entropy of the labelled (answer) tokens, each row's first one weighted `first_token_weight`
    times the others; 1 gives the plain mean that transformers' causal-LM loss computes.

    Args:
        logits (`torch.Tensor`): `(batch, length, vocabulary)`.
        labels (`torch.Tensor`): `(batch, length)`, -100 where not scored (the prompt).
        first_token_weight (`float`, defaults to 1): weight of each row's first labelled token.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    targets = labels[:, 1:]
    scored = targets != -100
    losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten().clamp(min=0), reduction="none"
    ).view_as(targets)
    weights = scored.float()
    first = scored.int().argmax(-1)  # the first scored position of each row (rows with none have weight 0 anyway)
    rows = torch.arange(len(first), device=first.device)
    weights[rows, first] *= first_token_weight
    return (losses * weights).sum() / weights.sum()


def scored_window(labels: torch.Tensor) -> int:
    """How many positions, counted from the end, hold every labelled token of every row and the position before the
    first of them: the `logits_to_keep` with which [`answer_loss`] of `labels[:, -window:]` equals that of all.

    Args:
        labels (`torch.Tensor`): `(batch, length)`, -100 where not scored.

    Returns:
        `int`: the window, between 2 and `length` (all of it when nothing is labelled).
    """
    length = labels.shape[1]
    scored = (labels != -100).any(0)
    if not bool(scored.any()):
        return length
    return min(length, length - int(scored.int().argmax()) + 1)


def task_loss(
    learner,
    task: Mapping[str, torch.Tensor],
    first_order: bool = False,
    locality: torch.Tensor | None = None,
    locality_weight: float = 0.0,
    first_token_weight: float = 1.0,
    summed_gradients: Mapping[str, torch.Tensor] | None = None,
    distillation_weight: float = 0.0,
) -> torch.Tensor:
    """The outer (answer) loss of one encoded task after one inner step on its documents.

    A task may hold several questions (rows of `input_ids`, a [`TaskGroup`]): one inner step, and the outer loss is
    the mean over the answer tokens of every row.

    Args:
        learner ([`ReGradForCausalLM`]): the learner (its LoRA tensors are theta, its step sizes alpha).
        task (`Mapping[str, torch.Tensor]`): `document_ids`, `document_mask`, `input_ids`, `labels`.
        first_order (`bool`, defaults to `False`): detach the inner gradient.
        locality (`torch.Tensor`, *optional*): token ids `(1, length)` of unrelated text for the locality term.
        locality_weight (`float`, defaults to 0): weight of the locality term (0: not computed).
        first_token_weight (`float`, defaults to 1): weight of the answer's first token in the outer loss
            ([`answer_loss`]; 1 is the plain mean).
        summed_gradients (`Mapping[str, torch.Tensor]`, *optional*): the documents' summed gradient, computed
            beforehand at the current LoRA tensors (a [`DocumentGradientCache`]). The inner step is then not
            recomputed and the LoRA tensors are held fixed (theta0 frozen): only the step sizes (and the gradient
            transform) get a gradient, and it equals the one of `first_order=True` up to rounding.
        distillation_weight (`float`, defaults to 0): weight of the RAG-teacher KL term (0: not computed; > 0 needs
            the task's `teacher_input_ids`/`teacher_labels`, see [`TaskCollator`]'s `teacher_prompts`).

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    lora = learner.lora_parameters()
    teacher = None
    if distillation_weight > 0:
        if "teacher_input_ids" not in task:
            raise ReGradValueError("distillation needs the teacher's prompts: collate with teacher_prompts=True")
        teacher = teacher_log_probs(
            learner.language_model, base_parameters(lora), task["teacher_input_ids"], task["teacher_labels"]
        )
    second_order = not first_order and summed_gradients is None and torch.is_grad_enabled()
    if summed_gradients is not None:
        summed = {name: summed_gradients[name].to(p.dtype).detach() for name, p in lora.items()}
        lora = {name: p.detach() for name, p in lora.items()}
    else:
        # The documents' forward is differentiated twice (second order): double backward through CPU flash SDPA is
        # not implemented, the math kernel supports it. The outer forwards below are differentiated once and keep
        # the default kernel, which stores no attention matrices: a question asked with its documents in the prompt
        # (ICL) is ~600 tokens.
        with sdpa_kernel(SDPBackend.MATH):
            inner = documents_lm_loss(learner.language_model, task["document_ids"], task["document_mask"])
            gradients = torch.autograd.grad(inner, list(lora.values()), create_graph=second_order, allow_unused=True)
        summed = {
            name: torch.zeros_like(p) if g is None else g if second_order else g.detach()
            for (name, p), g in zip(lora.items(), gradients, strict=True)
        }
    adapted = adapted_parameters(lora, summed, learner.step_sizes(), learner.config.gamma, learner.gradient_transform)
    # Logits only from the first answer token's predecessor on: the rest of a long (ICL) prompt's ~50k-way logits
    # would cost memory and time and score nothing.
    keep = scored_window(task["labels"])
    logits = functional_call(
        learner.language_model, adapted, args=(), kwargs={"input_ids": task["input_ids"], "logits_to_keep": keep}
    ).logits
    labels = task["labels"][:, -keep:]
    loss = answer_loss(logits, labels, first_token_weight)
    if teacher is not None:
        loss = loss + distillation_weight * distillation_loss(logits, labels, teacher)
    if locality is not None and locality_weight > 0:
        with torch.no_grad():
            reference = learner.language_model(input_ids=locality).logits.log_softmax(-1)
        adapted_logits = functional_call(learner.language_model, adapted, args=(), kwargs={"input_ids": locality})
        divergence = F.kl_div(adapted_logits.logits.log_softmax(-1), reference, log_target=True, reduction="none")
        loss = loss + locality_weight * divergence.sum(-1).mean()
    return loss


def meta_loss(
    learner,
    tasks: Sequence[Mapping[str, torch.Tensor]],
    first_order: bool = False,
    locality_weight: float = 0.0,
    first_token_weight: float = 1.0,
    summed_gradients: Sequence[Mapping[str, torch.Tensor]] | None = None,
    distillation_weight: float = 0.0,
) -> torch.Tensor:
    """Mean of [`task_loss`] over `tasks`; with `locality_weight > 0`, each task's locality text is the next task's
    first prompt and answer (so a batch needs two tasks or more). `summed_gradients`: one per task (see
    [`task_loss`])."""
    if locality_weight < 0:
        raise ReGradValueError(f"locality_weight must be >= 0, got {locality_weight}")
    check_distillation_weight(distillation_weight)
    check_first_token_weight(first_token_weight)
    if summed_gradients is not None and len(summed_gradients) != len(tasks):
        raise ReGradValueError(f"got {len(summed_gradients)} summed gradients for {len(tasks)} tasks")
    if locality_weight > 0 and len(tasks) < 2:
        raise ReGradValueError("the locality term needs at least 2 tasks per batch (per device): each task's locality "
                               "text is another task's question and answer")  # fmt: skip
    return torch.stack(
        [
            task_loss(
                learner,
                task,
                first_order,
                _first_row(tasks[(index + 1) % len(tasks)]),
                locality_weight,
                first_token_weight,
                None if summed_gradients is None else summed_gradients[index],
                distillation_weight,
            )
            for index, task in enumerate(tasks)
        ]
    ).mean()


def _first_row(task: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The first question's prompt and answer, `(1, length)`, without the right padding of a group's rows."""
    scored = (task["labels"][0] != -100).nonzero()
    length = int(scored[-1]) + 1 if len(scored) else task["input_ids"].shape[1]
    return task["input_ids"][:1, :length]

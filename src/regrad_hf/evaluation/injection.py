"""The side-by-side injection evaluation of a learner on tasks with their own documents (used by the trainer).

Cases, all on the same tasks and prompts:

| case            | LoRA start          | step on the task's document gradients | documents in the prompt |
|-----------------|---------------------|---------------------------------------|-------------------------|
| `no_adaptation` | the learner         | no                                    | no                      |
| `regrad`        | the learner         | yes                                   | no                      |
| `raw`           | the untrained start | yes                                   | no                      |
| `rag`           | the untrained start | no (an untrained start is the base)   | yes                     |
| `regrad_icl`    | the learner         | yes                                   | yes                     |

The gap between `no_adaptation` and `regrad` is the injection signal: without it, a falling training loss can be
the learner picking up answer priors.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from ..adaptation.deltas import truncation_report
from ..data.collator import TaskCollator
from ..data.task import Task
from ..errors import ReGradValueError
from ..log import progress_bar
from ..prompting import PromptTemplate
from .metrics import answer_contained, exact_match, f1_beyond_question, f1_score

CASES = ("no_adaptation", "regrad", "raw", "rag", "regrad_icl")


@dataclass
class CaseResult:
    """Mean metrics of one case over the evaluated tasks."""

    answer_loss: float
    exact_match: float
    f1: float
    prompt_tokens: float
    contained: float = float("nan")
    f1_beyond_question: float = float("nan")

    def as_dict(self) -> dict[str, float]:
        return dict(vars(self))


def _answer_loss(model, encoded: Mapping[str, torch.Tensor]) -> float:
    device = model.device
    with torch.no_grad():
        return model(input_ids=encoded["input_ids"].to(device), labels=encoded["labels"].to(device)).loss.item()


def _generate(model, tokenizer, prompt_ids: torch.Tensor, max_new_tokens: int, prompt: PromptTemplate) -> str:
    prompt_ids = prompt_ids.unsqueeze(0).to(model.device)
    output = model.generate(
        input_ids=prompt_ids,
        attention_mask=torch.ones_like(prompt_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_bank=False,
        **prompt.generation_kwargs(tokenizer, prompt_ids.shape[1]),
    )
    return prompt.cut(tokenizer.decode(output[0, prompt_ids.shape[1] :], skip_special_tokens=True))


@truncation_report()  # one warning for all the documents it truncates
def evaluate_injection(
    model,
    tasks: Sequence[Task],
    untrained_state: Mapping[str, torch.Tensor] | None = None,
    cases: Sequence[str] = ("no_adaptation", "regrad", "raw"),
    max_new_tokens: int = 24,
    max_document_tokens: int | None = None,
    generate: bool = True,
    show_progress: bool = False,
) -> dict[str, CaseResult]:
    """Answer loss, EM, F1, F1 beyond the question and answer-contained accuracy of `model` on `tasks` for each
    case of [`CASES`] (table in the module docstring), asked with the learner's prompt template.

    Args:
        model ([`ReGradForCausalLM`]): the learner (left exactly as it was).
        tasks (`Sequence[Task]`): evaluation tasks.
        untrained_state (`Mapping[str, torch.Tensor]`, *optional*): learner state of the untrained start (for
            `raw` and `rag`); required when those cases are asked for.
        cases (`Sequence[str]`): which cases to run.
        max_new_tokens (`int`): greedy answer length.
        max_document_tokens (`int`, *optional*): document truncation; defaults to the model's config.
        generate (`bool`): `False` skips generation (EM/F1 are then NaN): the answer loss alone is much cheaper.
        show_progress (`bool`): show a progress bar over the tasks.

    Returns:
        `dict[str, CaseResult]`
    """
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise ReGradValueError(f"unknown evaluation cases {unknown}; choose from {CASES}")
    if untrained_state is None and {"raw", "rag"} & set(cases):
        raise ReGradValueError("the raw and rag cases need the untrained learner state (untrained_state=)")
    tokenizer = model.tokenizer
    max_document_tokens = max_document_tokens or model.config.max_document_tokens
    prompt = PromptTemplate.from_config(model.config)  # the learner's own prompt, as in training
    collators = {
        blind: TaskCollator(tokenizer, max_document_tokens, max_answer_tokens=1 << 30, blind=blind, prompt=prompt)
        for blind in (True, False)
    }
    totals = {case: collections.defaultdict(float) for case in cases}
    was_training = model.training
    model.eval()
    try:
        for task in progress_bar(tasks, desc="Evaluating", enabled=show_progress):
            for case in cases:
                blind = case not in ("rag", "regrad_icl")
                encoded = collators[blind].encode(task)
                # The collator's prompt: everything before the answer (labels -100), as the loss sees it.
                prompt_ids = encoded["input_ids"][0][encoded["labels"][0] == -100]
                with ExitStack() as stack:
                    if case in ("raw", "rag"):
                        stack.enter_context(model.swapped_learner(untrained_state))
                    if case in ("regrad", "raw", "regrad_icl"):
                        stack.enter_context(model.knowledge(list(task.documents)))
                    totals[case]["answer_loss"] += _answer_loss(model, encoded)
                    if generate:
                        prediction = _generate(model, tokenizer, prompt_ids, max_new_tokens, prompt)
                        totals[case]["exact_match"] += exact_match(prediction, task.answers)
                        totals[case]["contained"] += answer_contained(prediction, task.answers)
                        totals[case]["f1"] += f1_score(prediction, task.answers)
                        beyond = f1_beyond_question(prediction, task.answers, task.question)
                        totals[case]["f1_beyond_question"] += beyond
                totals[case]["prompt_tokens"] += len(prompt_ids)
    finally:
        model.train(was_training)
    count = max(1, len(tasks))
    nan = float("nan")
    return {
        case: CaseResult(
            answer_loss=values["answer_loss"] / count,
            exact_match=values["exact_match"] / count if generate else nan,
            f1=values["f1"] / count if generate else nan,
            prompt_tokens=values["prompt_tokens"] / count,
            contained=values["contained"] / count if generate else nan,
            f1_beyond_question=values["f1_beyond_question"] / count if generate else nan,
        )
        for case, values in totals.items()
    }

"""The knowledge probe of `regrad eval`: does a method know the answer, whatever form its own answers take?

Greedy answers of a 135M model are often sentences, loops or the right fact in the wrong words, so string metrics
(EM, F1, contained) mix knowledge with format. The probe reads the model's probabilities instead, after each
method's own prompt and with its own adaptation applied (a ReGrad step, documents in a RAG prompt):

- **Ranking**: the reference answer and [`PROBE_DISTRACTORS`] answers of other questions of the same evaluation set
  are each scored by the mean log-probability of their tokens (teacher-forced, one padded forward of the candidates;
  the mean is length-fair: a long candidate is not penalised for its length). The question counts as known when the
  reference scores strictly highest (a tie counts against it); chance is 1 / (1 + [`PROBE_DISTRACTORS`]).
- **First token**: the NLL of the reference answer's first token after the prompt, and whether it is the greedy
  next token (top-1).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.task import Task
from ..errors import ReGradValueError
from ..kv_cache import cache_keyword, returned_cache
from .metrics import normalize_answer

# Wrong answers ranked against the reference answer of each question (chance accuracy 1 / 4).
PROBE_DISTRACTORS = 3
# The per-question score `regrad eval` summarises: 1.0 when the reference answer ranks first.
PROBE_METRIC = "probe_accuracy"


@dataclass(frozen=True)
class NextTokenScore:
    """How a model scores one token as the next token.

    Args:
        nll (`float`): its negative log-probability (natural log).
        rank (`int`): how many tokens are strictly more likely (0: no token beats it).
        top1 (`bool`): whether it is the greedy choice (the arg-max; ties go to the lowest token id, as in greedy
            decoding).
    """

    nll: float
    rank: int
    top1: bool


def next_token_score(logits: torch.Tensor, token_id: int) -> NextTokenScore:
    """Scores `token_id` as the next token under the logits of one position.

    Args:
        logits (`torch.Tensor`): the logits of the position before the token, of shape `(vocab_size,)`.
        token_id (`int`): the token to score.

    Returns:
        [`NextTokenScore`]: its NLL, rank and whether it is the greedy next token.
    """
    if logits.dim() != 1 or not 0 <= token_id < logits.numel():
        raise ReGradValueError(
            f"need one position's logits and a token id in range, got {tuple(logits.shape)}, {token_id}"
        )
    logits = logits.detach().float()
    nll = -torch.log_softmax(logits, dim=-1)[token_id].item()
    rank = int((logits > logits[token_id]).sum())
    return NextTokenScore(nll, rank, int(logits.argmax()) == token_id)


def prompt_cache(model, prompt_ids: Sequence[int]):
    """The KV cache of every prompt token but the last, so that scoring continuations and generating after one prompt
    run the prompt once instead of once per use (a RAG prompt is hundreds of tokens, its answers a few).

    Args:
        model: a causal LM that returns its KV cache with `use_cache=True` (any transformers one).
        prompt_ids (`Sequence[int]`): the prompt's token ids.

    Returns:
        The cache (a transformers `Cache`), or `None` when there is nothing to cache (a one-token prompt) or the model
        returns none. Each use takes a copy ([`continuation_logits`]) except a last one, which may consume it.
    """
    if len(prompt_ids) < 2:
        return None
    with torch.no_grad():
        output = model(input_ids=torch.tensor([list(prompt_ids[:-1])], device=model.device), use_cache=True)
    return returned_cache(output)


def continuation_logits(model, prompt_ids: Sequence[int], continuation: Sequence[int], cache=None) -> torch.Tensor:
    """The logits that predict each token of `continuation` after `prompt_ids`, teacher-forced.

    Args:
        model: a causal LM.
        prompt_ids (`Sequence[int]`): the prompt's token ids (at least one).
        continuation (`Sequence[int]`): the continuation's token ids (at least one).
        cache (*optional*): [`prompt_cache`] of `prompt_ids` (left unchanged: a copy is extended); without it the
            prompt runs again.

    Returns:
        `torch.Tensor`: float logits of shape `(len(continuation), vocab_size)`; row 0 is the next-token distribution
        after the prompt.
    """
    if not prompt_ids or not continuation:
        raise ReGradValueError("scoring a continuation needs a non-empty prompt and a non-empty continuation")
    prompt, continuation = list(prompt_ids), list(continuation)
    with torch.no_grad():
        if cache is None:
            input_ids = torch.tensor([prompt + continuation[:-1]], device=model.device)
            logits = model(input_ids=input_ids, logits_to_keep=len(continuation)).logits[0]
        else:
            # From the prompt's last token on: the cache holds the rest of the prompt.
            input_ids = torch.tensor([prompt[-1:] + continuation[:-1]], device=model.device)
            reuse = {cache_keyword(model): copy.deepcopy(cache), "use_cache": True}
            logits = model(input_ids=input_ids, **reuse).logits[0]
    return logits[-len(continuation) :].float()


def candidate_log_probs(
    model, prompt_ids: Sequence[int], candidates: Sequence[Sequence[int]], cache=None
) -> list[float]:
    """Mean log-probability per token of each candidate continuation after one prompt, teacher-forced.

    Without `cache`: one forward of a right-padded batch with a row per candidate, computing only the logits of the
    candidates' positions (`logits_to_keep`). With `cache` ([`prompt_cache`] of `prompt_ids`): one short forward per
    candidate after the cached prompt, so the prompt is not run again for each candidate.

    Args:
        model: a causal LM (e.g. [`ReGradForCausalLM`], with whatever adaptation is active), with `.tokenizer` for
            the pad id when it has one.
        prompt_ids (`Sequence[int]`): the prompt's token ids (at least one).
        candidates (`Sequence[Sequence[int]]`): each candidate's token ids (at least one each).
        cache (*optional*): the prompt's [`prompt_cache`] (left unchanged).

    Returns:
        `list[float]`: the mean token log-probability of each candidate, in the given order.
    """
    if not prompt_ids or not candidates or any(len(ids) == 0 for ids in candidates):
        raise ReGradValueError("scoring candidates needs a non-empty prompt and non-empty candidates")
    if cache is not None:
        return [_mean_log_prob(continuation_logits(model, prompt_ids, ids, cache), ids) for ids in candidates]
    prompt, longest = list(prompt_ids), max(len(ids) for ids in candidates)
    tokenizer = getattr(model, "tokenizer", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    input_ids = torch.full((len(candidates), len(prompt) + longest), 0 if pad is None else pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(candidates):
        input_ids[row, : len(prompt) + len(ids)] = torch.tensor(prompt + list(ids))
        attention_mask[row, : len(prompt) + len(ids)] = 1
    device = model.device
    with torch.no_grad():
        # The last `longest + 1` positions: from the prompt's last token (predicting each candidate's first) on.
        logits = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), logits_to_keep=longest + 1
        ).logits[:, -(longest + 1) : -1]
    return [_mean_log_prob(logits[row, : len(ids)].float(), ids) for row, ids in enumerate(candidates)]


def _mean_log_prob(logits: torch.Tensor, ids: Sequence[int]) -> float:
    """The mean log-probability of `ids` under `logits` (one row per token, row `i` predicting `ids[i]`)."""
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(list(ids), device=log_probs.device)
    return log_probs[torch.arange(len(ids), device=log_probs.device), targets].mean().item()


def gold_rank(scores: Sequence[float], gold: int = 0) -> int:
    """The rank of `scores[gold]` among `scores`: 1 + how many other candidates score at least as high (a tie counts
    against the gold candidate, so rank 1 means it is strictly best).

    Args:
        scores (`Sequence[float]`): one score per candidate, higher is better.
        gold (`int`): the index of the right candidate.

    Returns:
        `int`: 1 (ranked first) to `len(scores)`.
    """
    if not 0 <= gold < len(scores):
        raise ReGradValueError(f"gold index {gold} is not among {len(scores)} scores")
    return 1 + sum(score >= scores[gold] for index, score in enumerate(scores) if index != gold)


def probe_candidates(
    tasks: Sequence[Task], index: int, seed: int = 0, distractors: int = PROBE_DISTRACTORS
) -> list[str] | None:
    """The candidates of question `index`'s probe: its reference answer, then `distractors` reference answers of
    other questions of `tasks` (the same evaluation set).

    Drawn with a generator seeded by `seed` and `index` alone, so a question's candidates repeat and do not depend
    on the other questions' draws. A distractor is refused when its normalised text (SQuAD normalisation) is empty,
    equals any acceptable answer of the question or repeats one already drawn.

    Args:
        tasks (`Sequence[Task]`): every question of the evaluation set, in evaluation order.
        index (`int`): the question whose candidates to draw.
        seed (`int`): the seed of the draw.
        distractors (`int`): how many wrong answers.

    Returns:
        `list[str] | None`: `[reference, distractor, ...]` (the reference first), or `None` when the set has too
        few distinct other answers.
    """
    if not 0 <= index < len(tasks) or distractors < 1:
        raise ReGradValueError(f"question {index} of {len(tasks)} with {distractors} distractors cannot be probed")
    task = tasks[index]
    taken = {normalize_answer(answer) for answer in task.answers} | {normalize_answer(task.answer), ""}
    others = [i for i in range(len(tasks)) if i != index]
    random.Random(f"regrad-probe:{seed}:{index}").shuffle(others)
    chosen: list[str] = []
    for other in others:
        text = tasks[other].answer.strip()
        if normalize_answer(text) not in taken:
            chosen.append(text)
            taken.add(normalize_answer(text))
            if len(chosen) == distractors:
                return [task.answer.strip(), *chosen]
    return None


def probe_fields(scores: Sequence[float] | None) -> dict:
    """A method's probe fields of one question's record in `results.json`.

    Args:
        scores (`Sequence[float]`, *optional*): the candidates' scores, the reference answer's first; `None` when the
            question has no probe (too few distinct distractors).

    Returns:
        `dict`: `probe_accuracy` (1.0 if the reference ranks first, else 0.0; NaN without a probe, which the summary
        leaves out), `probe_rank` (1 to the number of candidates, or `None`) and `probe_scores` (the scores or `None`).
    """
    rank = None if scores is None else gold_rank(scores)
    accuracy = float("nan") if rank is None else float(rank == 1)
    return {PROBE_METRIC: accuracy, "probe_rank": rank, "probe_scores": None if scores is None else list(scores)}

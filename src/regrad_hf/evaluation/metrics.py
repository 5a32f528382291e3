"""Answer metrics (SQuAD v1.1 EM/F1, F1 beyond the question, answer-contained accuracy, repetition), retrieval
recall@k and bootstrap confidence intervals."""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Collection, Sequence

import numpy as np

from ..errors import ReGradValueError


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer."""
    return float(any(normalize_answer(prediction) == normalize_answer(answer) for answer in answers))


def _token_f1(predicted: list[str], gold: list[str]) -> float:
    common = collections.Counter(predicted) & collections.Counter(gold)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Best token-level F1 of the prediction against the answers (the SQuAD v1.1 evaluation script's definition)."""
    predicted = normalize_answer(prediction).split()
    return max(_token_f1(predicted, normalize_answer(answer).split()) for answer in answers)


def f1_beyond_question(prediction: str, answers: Sequence[str], question: str) -> float:
    """Best token-level F1 over the words that are not in the question (normalised as SQuAD does).

    The metric for sentence answers (TOFU's): "What is the profession of Marit Hagen's father?" answered "Marit
    Hagen's father is a German artist" has F1 0.33 against "Marit Hagen's father is a Registered Nurse by
    profession" for restating the question, and 0 here. An answer whose words all appear in the question (e.g. a
    choice the question offers) is scored on all its words; a prediction that only restates the question scores 0.
    """
    asked = set(normalize_answer(question).split())
    words = normalize_answer(prediction).split()
    beyond = [word for word in words if word not in asked]
    scores = []
    for answer in answers:
        gold = normalize_answer(answer).split()
        gold_beyond = [word for word in gold if word not in asked]
        scores.append(_token_f1(beyond, gold_beyond) if gold_beyond else _token_f1(words, gold))
    return max(scores)


def answer_contained(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if some normalised answer appears in the normalised prediction as a whole-word span.

    The fair metric when a method answers in sentences: "It flows into Lake Merrow." contains "Lake Merrow", which
    EM misses and F1 scores low. Whole words, so that "1987" is not found in "19870".
    """
    predicted = f" {normalize_answer(prediction)} "
    return float(any(normalize_answer(a) and f" {normalize_answer(a)} " in predicted for a in answers))


def has_repetition(prediction: str, n: int = 3) -> float:
    """1.0 if some word `n`-gram occurs twice in the prediction (normalised words), e.g. "River River River"."""
    words = normalize_answer(prediction).split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return float(len(grams) != len(set(grams)))


def recall_at_k(retrieved: Sequence[str], gold: Collection[str], k: int | None = None) -> float:
    """Fraction of the gold documents among the first `k` retrieved ids (all of them when `k` is `None`).

    With one gold document this is the hit rate: 1.0 if it was retrieved, else 0.0.
    """
    if not gold:
        raise ReGradValueError("recall@k needs at least one gold document")
    top = set(retrieved if k is None else retrieved[:k])
    return sum(doc in top for doc in set(gold)) / len(set(gold))


def bootstrap_ci(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of `values` (`scipy.stats.bootstrap`, seeded, so it
    repeats).

    Args:
        values (`Sequence[float]`): one value per question.
        confidence (`float`): coverage of the interval.
        resamples (`int`): bootstrap resamples.
        seed (`int`): seed of the resampling.

    Returns:
        `tuple[float, float]`: the lower and upper bounds (NaN when `values` is empty; the value itself for one).
    """
    from scipy.stats import bootstrap  # scipy comes with sentence-transformers; imported when a report needs it

    if not isinstance(resamples, int) or isinstance(resamples, bool) or resamples < 1:
        raise ReGradValueError(f"bootstrap resamples must be an integer of at least 1, got {resamples!r}")
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return float("nan"), float("nan")
    if data.size == 1:  # scipy needs two observations; one value resamples only to itself
        return float(data[0]), float(data[0])
    interval = bootstrap(
        (data,),
        np.mean,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",  # as the reports have always given it (BCa would change every published interval)
        vectorized=True,
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return float(interval.low), float(interval.high)

"""Evaluation sets: the questions, the documents of the bank they are retrieved against, and each question's gold
documents.

| format     | bank                                                        | retrieval                                |
|------------|-------------------------------------------------------------|------------------------------------------|
| `squad`    | every paragraph of the selected articles                    | top-k over the whole bank                |
| `hotpotqa` | the 10 paragraphs (2 supporting + 8 distractors) of each question | top-k over the question's own 10   |
| `tofu`     | the selected authors' answers, 5 whole facts per document   | top-k over the whole bank                |
| `jsonl`    | every task's documents (deduplicated)                       | top-k over the whole bank                |

The data is a local file, a dataset folder, a Hub dataset name or a `datasets.Dataset`; by default the format's Hub
dataset (`rajpurkar/squad` validation, `hotpotqa/hotpot_qa` distractor validation, `locuslab/TOFU` full).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..data.task import HUB_DATASETS, SQUAD_SPLITS, Task, load_hotpotqa, load_jsonl, load_squad
from ..data.task_sets import SPLITS, TOFU_FACTS_PER_DOCUMENT, hotpotqa_split_records, tofu_tasks
from ..errors import ReGradTypeError, ReGradValueError

FORMATS = ("squad", "hotpotqa", "tofu", "jsonl")


@dataclass(frozen=True)
class EvalQuestion:
    """One evaluation question.

    Args:
        task ([`Task`]): question and acceptable answers (its documents are the gold documents).
        gold_ids (`tuple[str, ...]`): bank ids of the gold documents.
        candidate_ids (`tuple[str, ...]`, *optional*): when set, retrieval ranks only these (HotpotQA); else the
            whole bank.
    """

    task: Task
    gold_ids: tuple[str, ...]
    candidate_ids: tuple[str, ...] | None = None


@dataclass
class EvalSet:
    """Questions and the bank documents they are answered from.

    Args:
        name (`str`): a label, e.g. `"squad:test"`.
        documents (`dict[str, str]`): bank documents by id, in bank order.
        questions (`list[EvalQuestion]`): the questions, in evaluation order.
        note (`str`): how the set was built (stated in the report).
    """

    name: str
    documents: dict[str, str]
    questions: list[EvalQuestion]
    note: str = ""


# More indices than any data set has: a range such as 0-99999999999 would fill the memory before anything is read.
MAX_INDICES = 1_000_000


def parse_range(text: str) -> list[int]:
    """`"35-39"` -> `[35, ..., 39]`; `"1,4,7"` -> `[1, 4, 7]`; ranges and single values may be mixed.

    Raises:
        [`ReGradValueError`]: `text` is not indices, a range is backwards (`"39-35"`, which would select nothing), or
            it names more than [`MAX_INDICES`] indices.
    """
    values: list[int] = []
    for part in text.split(","):
        # [0-9], not \d: int() would also read other scripts' digits, which no one means as an index.
        match = re.fullmatch(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", part)
        if not match:
            raise ReGradValueError(f"cannot read {text!r} as indices; write e.g. '35-39' or '1,4,7'")
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low:
            raise ReGradValueError(f"the range {part.strip()!r} in {text!r} is backwards: write {high}-{low}")
        if len(values) + high - low + 1 > MAX_INDICES:
            raise ReGradValueError(f"{text!r} names more than {MAX_INDICES:,} indices")
        values.extend(range(low, high + 1))
    return values


def _select(questions: list[EvalQuestion], limit: int | None, seed: int) -> list[EvalQuestion]:
    questions = list(questions)
    random.Random(seed).shuffle(questions)
    return questions if limit is None else questions[:limit]


def _bank_of(texts: Sequence[str], prefix: str) -> dict[str, str]:
    """Unique texts in first-seen order, with ids `prefix-0`, `prefix-1`, ..."""
    unique = list(dict.fromkeys(texts))
    return {f"{prefix}-{index}": text for index, text in enumerate(unique)}


def _whole_bank_set(name: str, tasks: list[Task], prefix: str, limit, seed, note: str) -> EvalSet:
    documents = _bank_of([d for task in tasks for d in task.documents], prefix)
    id_of = {text: doc_id for doc_id, text in documents.items()}
    questions = [EvalQuestion(task, tuple(id_of[d] for d in task.documents)) for task in tasks]
    return EvalSet(name, documents, _select(questions, limit, seed), note)


def load_eval_set(
    format: str, path: Any = None, split: str | None = None, limit: int | None = None, seed: int = 0
) -> EvalSet:
    """Loads an evaluation set.

    Args:
        format (`str`): one of [`FORMATS`].
        path: the data: a local file, a dataset folder, a Hub dataset name or a `datasets.Dataset` (see
            [`regrad_hf.data.sources.read_rows`]); by default the format's Hub dataset ([`HUB_DATASETS`]; not for
            `jsonl`).
        split (`str`, *optional*): a split name of the meta-training task sets (`train`, `dev`, `test`, see
            [`regrad_hf.data.task_sets`]: SQuAD articles, TOFU authors, HotpotQA records, disjoint), or indices: SQuAD
            article, TOFU author, HotpotQA record indices (`"35-39"`); JSONL: unused. `None` keeps everything.
        limit (`int`, *optional*): evaluate this many questions, sampled with `seed` (the bank is unchanged).
        seed (`int`): seed of the question sampling.

    Returns:
        [`EvalSet`]
    """
    if format not in FORMATS:
        raise ReGradValueError(f"unknown dataset format {format!r}; choose from {FORMATS}")
    if split is not None and not isinstance(split, str):
        raise ReGradTypeError(f"split must be a string such as 'test' or '35-39', got {type(split).__name__}")
    for name, value, least in (("limit", limit, 1), ("seed", seed, 0)):
        # limit=-1 would slice off the last question, limit=0 leaves none; a str seed would be hashed silently.
        if (value is not None or name == "seed") and (
            not isinstance(value, int) or isinstance(value, bool) or value < least
        ):
            raise ReGradValueError(f"{name} must be an integer of at least {least}, got {value!r}")
    if path is None:
        if format not in HUB_DATASETS:
            raise ReGradValueError(f"the {format} format has no default dataset: give the data")
        path = HUB_DATASETS[format].repo_id
    if format == "squad":
        articles = split if split in SQUAD_SPLITS or split is None else parse_range(split)
        tasks = load_squad(path, articles)
        note = f"SQuAD articles {split or 'all'}; the bank holds every paragraph of these articles"
        return _whole_bank_set(f"squad:{split or 'all'}", tasks, "p", limit, seed, note)
    if format == "tofu":
        authors = None if split is None else split if split in SPLITS else parse_range(split)
        tasks = tofu_tasks(path, authors, TOFU_FACTS_PER_DOCUMENT)
        note = (
            f"TOFU authors {split or 'all'}; TOFU has no source documents, so each author's answers (in file order) "
            f"make documents of {TOFU_FACTS_PER_DOCUMENT} whole facts, as in meta-training (none is truncated; the "
            "answer to every question is in its gold document)"
        )
        return _whole_bank_set(f"tofu:{split or 'all'}", tasks, "author", limit, seed, note)
    if format == "jsonl":
        note = "user JSONL; the bank holds every task's documents"
        label = os.path.basename(path) if isinstance(path, (str, os.PathLike)) else "dataset"
        return _whole_bank_set(f"jsonl:{label}", load_jsonl(path), "doc", limit, seed, note)
    records = None if split is None else hotpotqa_split_records(path, split) if split in SPLITS else parse_range(split)
    return _hotpotqa_set(path, records, split, limit, seed)


def _hotpotqa_set(path, records, split, limit, seed) -> EvalSet:
    with_context = load_hotpotqa(path, distractors=True, records=records)
    supporting = load_hotpotqa(path, distractors=False, records=records)
    documents = _bank_of([d for task in with_context for d in task.documents], "para")
    id_of = {text: doc_id for doc_id, text in documents.items()}
    questions = [
        EvalQuestion(
            gold,
            tuple(id_of[d] for d in gold.documents),
            candidate_ids=tuple(dict.fromkeys(id_of[d] for d in full.documents)),
        )
        for full, gold in zip(with_context, supporting, strict=True)
    ]
    questions = _select(questions, limit, seed)
    # Only the selected questions' paragraphs need gradients.
    needed = {doc_id for q in questions for doc_id in q.candidate_ids}
    documents = {doc_id: text for doc_id, text in documents.items() if doc_id in needed}
    note = (
        f"HotpotQA distractor setting, records {split or 'all'}; each question is retrieved against its own 10 "
        "paragraphs; gold = supporting"
    )
    return EvalSet(f"hotpotqa:{split or 'all'}", documents, questions, note)

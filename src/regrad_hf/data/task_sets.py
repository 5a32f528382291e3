"""Meta-training task sets: disjoint train/dev/test splits per source, a mixed set, and hard distractors.

At inference the model sums the gradients of the top-k retrieved documents, usually the gold one plus its nearest
neighbours. [`with_hard_distractors`] gives every training task the same: its gold documents, then the documents of
the split nearest to the question by the bank's own embedder (never a gold one), up to `documents_per_task`.

Splits share no document: SQuAD by article, TOFU by author, HotpotQA by record (a dev or test record whose
paragraph titles appear in an earlier split is dropped).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence

import numpy as np

from ..errors import ReGradValueError
from .task import SQUAD_SPLITS, Task, hotpotqa_paragraphs, hotpotqa_rows, load_hotpotqa, load_squad, load_tofu

SPLITS = ("train", "dev", "test")
TOFU_SPLITS: dict[str, range] = {"train": range(0, 120), "dev": range(120, 150), "test": range(150, 180)}
# Record indices of the shared 500-record HotpotQA dev file (78 records lack their supporting paragraphs).
HOTPOTQA_SPLITS: dict[str, range] = {"train": range(0, 350), "dev": range(350, 425), "test": range(425, 500)}
# Whole TOFU facts per document: a whole author (~800 tokens) would be cut at the learner's 512.
TOFU_FACTS_PER_DOCUMENT = 5


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ReGradValueError(f"unknown split {split!r}; use one of {SPLITS}")


def squad_tasks(path: str | os.PathLike, split: str) -> list[Task]:
    """SQuAD tasks of one article split ([`SQUAD_SPLITS`]: articles 0-29 / 30-34 / 35-39); one paragraph each."""
    _check_split(split)
    return load_squad(path, SQUAD_SPLITS[split])


def tofu_tasks(
    path: str | os.PathLike, split: str | Iterable[int] | None, facts_per_document: int = TOFU_FACTS_PER_DOCUMENT
) -> list[Task]:
    """TOFU tasks of one author split ([`TOFU_SPLITS`]: authors 0-119 / 120-149 / 150-179), of the given author
    indices, or (`None`) of every author.

    An author's 20 facts (answer sentences) are cut into documents of `facts_per_document` whole facts, so that
    no document is truncated in the inner step (a whole author is ~800 tokens) and no fact is cut. A question's
    gold document is the one holding its own answer sentence.
    """
    if isinstance(split, str):
        _check_split(split)
        split = TOFU_SPLITS[split]
    if not isinstance(facts_per_document, int) or isinstance(facts_per_document, bool) or facts_per_document < 1:
        raise ReGradValueError("facts_per_document must be at least 1")
    tasks = []
    by_author: dict[str, list[Task]] = {}
    for task in load_tofu(path, split):
        by_author.setdefault(task.id.rsplit("-", 1)[0], []).append(task)
    for questions in by_author.values():
        for start in range(0, len(questions), facts_per_document):
            group = questions[start : start + facts_per_document]
            document = " ".join(task.answer.strip() for task in group)
            tasks.extend(Task((document,), task.question, task.answer, task.answers, task.id) for task in group)
    return tasks


def hotpotqa_tasks(path: str | os.PathLike, split: str) -> list[Task]:
    """HotpotQA tasks of one record split ([`HOTPOTQA_SPLITS`]); documents are the supporting paragraphs.

    Records without their supporting paragraphs are skipped (with the loader's warning); a dev or test record
    sharing a paragraph title with an earlier split is dropped, so no document is in two splits.
    """
    return _hotpotqa_split(path, split)[0]


def hotpotqa_split_records(source, split: str) -> list[int]:
    """Indices of the records of one HotpotQA split ([`HOTPOTQA_SPLITS`]) that share no paragraph title with an
    earlier split (so that no document is in two splits).

    Args:
        source: the HotpotQA data (as [`load_hotpotqa`] reads it), in the shared 500-record order.
        split (`str`): `train`, `dev` or `test`.
    """
    return _split_record_indices(hotpotqa_rows(source), split, source)


def _split_record_indices(rows, split: str, source) -> list[int]:
    _check_split(split)
    if len(rows) < HOTPOTQA_SPLITS[split].stop:
        raise ReGradValueError(f"{source}: {len(rows)} HotpotQA records; the {split} split needs records up to "
                               f"{HOTPOTQA_SPLITS[split].stop - 1}")  # fmt: skip

    def titles(index: int) -> set[str]:
        return {title for title, _ in hotpotqa_paragraphs(rows[index])}

    earlier = set()
    for name in SPLITS[: SPLITS.index(split)]:
        earlier.update(title for index in HOTPOTQA_SPLITS[name] for title in titles(index))
    return [index for index in HOTPOTQA_SPLITS[split] if not titles(index) & earlier]


def _hotpotqa_split(path: str | os.PathLike, split: str) -> tuple[list[Task], list[str]]:
    """The split's tasks and its retrieval pool (all ten paragraphs of each kept record)."""
    rows = hotpotqa_rows(path)
    keep = _split_record_indices(rows, split, path)
    pool = [paragraph for index in keep for _, paragraph in hotpotqa_paragraphs(rows[index])]
    return load_hotpotqa(path, records=keep), pool


def task_pool(tasks: Sequence[Task], extra: Sequence[str] = ()) -> list[str]:
    """Every distinct document of `tasks` plus `extra`, in first-seen order."""
    return list(dict.fromkeys([d for task in tasks for d in task.documents] + list(extra)))


def with_hard_distractors(
    tasks: Sequence[Task], documents_per_task: int, embedder, pool: Sequence[str] | None = None, batch_size: int = 64
) -> list[Task]:
    """Adds to each task the non-gold documents of `pool` nearest to its question, up to `documents_per_task`.

    Args:
        tasks (`Sequence[Task]`): tasks whose documents are their gold documents.
        documents_per_task (`int`): documents per task after padding (3 = top-3 retrieval).
        embedder: a `SentenceTransformer` (the bank's embedder); scores are cosine similarities, as the bank's.
        pool (`Sequence[str]`, *optional*): the documents to draw from; defaults to every document of `tasks`.
        batch_size (`int`): embedding batch size.

    Returns:
        `list[Task]`: the tasks with their gold documents first, then the distractors, nearest first.
    """
    pool = task_pool(tasks) if pool is None else list(dict.fromkeys(pool))
    if documents_per_task < 1:
        raise ReGradValueError("documents_per_task must be at least 1")
    widest = max((len(task.documents) for task in tasks), default=0)
    if len(pool) < documents_per_task + widest - 1:
        raise ReGradValueError(f"a pool of {len(pool)} documents cannot pad tasks to {documents_per_task}")

    def embed(texts: list[str]) -> np.ndarray:
        return embedder.encode(
            texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )

    documents = embed(pool)
    questions = embed([task.question for task in tasks])
    padded = []
    for task, scores in zip(tasks, questions @ documents.T, strict=True):
        missing = documents_per_task - len(task.documents)
        distractors: list[str] = []
        for index in np.argsort(-scores, kind="stable"):
            if len(distractors) >= missing:
                break
            if pool[index] not in task.documents:
                distractors.append(pool[index])
        padded.append(Task((*task.documents, *distractors), task.question, task.answer, task.answers, task.id))
    return padded


def mixed_tasks(
    split: str,
    squad: str | os.PathLike | None = None,
    tofu: str | os.PathLike | None = None,
    hotpotqa: str | os.PathLike | None = None,
    documents_per_task: int = 1,
    embedder=None,
    seed: int = 0,
    max_tasks_per_source: int | None = None,
    tofu_facts_per_document: int = TOFU_FACTS_PER_DOCUMENT,
) -> list[Task]:
    """The mixed task set of one split from the sources given, each padded with hard distractors from its own
    split (the bank of that source), shuffled with `seed`.

    Args:
        split (`str`): `train`, `dev` or `test`.
        squad / tofu / hotpotqa: the source files (any may be `None`).
        documents_per_task (`int`): 1 = gold documents only; more = hard distractors (needs `embedder`).
        embedder: the bank's `SentenceTransformer`.
        seed (`int`): shuffle seed.
        max_tasks_per_source (`int`, *optional*): keep at most this many tasks of each source (a seeded sample),
            e.g. for a small dev set.
        tofu_facts_per_document (`int`, defaults to 5): whole TOFU facts per document (see [`tofu_tasks`]).
    """
    sources: list[tuple[list[Task], list[str]]] = []
    if squad:
        sources.append((squad_tasks(squad, split), []))
    if tofu:
        sources.append((tofu_tasks(tofu, split, tofu_facts_per_document), []))
    if hotpotqa:
        sources.append(_hotpotqa_split(hotpotqa, split))
    if not sources:
        raise ReGradValueError("mixed_tasks needs at least one of squad, tofu, hotpotqa")
    rng = random.Random(seed)
    tasks = []
    for source, extra in sources:
        pool = task_pool(source, extra)
        if max_tasks_per_source is not None and len(source) > max_tasks_per_source:
            source = rng.sample(source, max_tasks_per_source)
        if documents_per_task > 1:
            if embedder is None:
                raise ReGradValueError("hard distractors need the bank's embedder")
            source = with_hard_distractors(source, documents_per_task, embedder, pool)
        tasks.extend(source)
    rng.shuffle(tasks)
    return tasks

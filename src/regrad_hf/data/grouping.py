"""Task groups: several questions about one document set, trained against one inner step (the amortised recipe).

A meta-training task spends almost all of its cost on the documents (forward, backward and, second order, a
backward again) and gets a handful of answer tokens back. Questions that retrieve the same documents share that
inner step: a [`TaskGroup`] carries the documents once and every question about them, and the objective computes
the inner gradient once and the outer loss over all of its questions in one padded pass (Q outer losses for one
double backward). SQuAD has ~5 questions per paragraph, a TOFU document of 5 facts has 5, a synthetic document as
many as are generated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ReGradValueError
from .task import Task, as_tasks, task_from_record
from .task_sets import with_hard_distractors


@dataclass(frozen=True)
class TaskGroup:
    """Questions that share one document set.

    Args:
        documents (`tuple[str, ...]`): the documents whose summed gradient is the one inner step (gold first).
        tasks (`tuple[Task, ...]`): the questions (their own `documents` are ignored in training: the group's count).
        id (`str`, *optional*): an identifier; defaults to the first task's id.
    """

    documents: tuple[str, ...]
    tasks: tuple[Task, ...]
    id: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "documents", tuple(self.documents))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.documents or not all(isinstance(d, str) and d.strip() for d in self.documents):
            raise ReGradValueError(f"task group {self.id!r}: documents must be non-empty strings")
        if not self.tasks or not all(isinstance(task, Task) for task in self.tasks):
            raise ReGradValueError(f"task group {self.id!r}: tasks must be a non-empty list of Tasks")
        if self.id is None:
            object.__setattr__(self, "id", self.tasks[0].id)

    def to_dict(self) -> dict[str, Any]:
        return {"documents": list(self.documents), "tasks": [task.to_dict() for task in self.tasks], "id": self.id}

    @classmethod
    def from_dict(cls, record: Mapping, where: str = "a task group record") -> TaskGroup:
        """The inverse of [`to_dict`]; a malformed record raises [`ReGradValueError`] naming `where`."""
        if not isinstance(record, Mapping) or not {"documents", "tasks"} <= set(record):
            raise ReGradValueError(f"{where} needs 'documents' and 'tasks'")
        tasks = record["tasks"]
        if isinstance(tasks, (str, bytes, Mapping)) or not isinstance(tasks, Iterable):
            raise ReGradValueError(f"{where}: tasks must be a list of task records")
        return cls(
            tuple(record["documents"]),
            tuple(task_from_record(task, f"{where} task {n}") for n, task in enumerate(tasks)),
            record.get("id"),
        )


def group_by_documents(tasks: Sequence[Task], max_questions: int = 8) -> list[TaskGroup]:
    """Groups tasks whose documents are the same, in first-seen order, in groups of at most `max_questions`.

    Args:
        tasks (`Sequence[Task]`): tasks with their gold documents (before any distractors are added: a question's
            nearest distractors differ from its neighbour's, so padded tasks rarely share documents).
        max_questions (`int`, defaults to 8): questions per group; larger sets are cut into consecutive groups.

    Returns:
        `list[TaskGroup]`: one group per document set and chunk, the tasks in their given order.
    """
    if isinstance(max_questions, bool) or not isinstance(max_questions, int) or max_questions < 1:
        raise ReGradValueError(f"max_questions must be a positive integer, got {max_questions!r}")
    by_documents: dict[tuple[str, ...], list[Task]] = {}
    for task in tasks:
        by_documents.setdefault(task.documents, []).append(task)
    return [
        TaskGroup(documents, tuple(questions[start : start + max_questions]))
        for documents, questions in by_documents.items()
        for start in range(0, len(questions), max_questions)
    ]


def with_group_distractors(
    groups: Sequence[TaskGroup], documents_per_task: int, embedder, pool: Sequence[str] | None = None
) -> list[TaskGroup]:
    """Pads each group with the non-gold documents of `pool` nearest to its questions taken together (their text
    joined, embedded by the bank's embedder), as top-k retrieval for any of them would mostly return.

    Args:
        groups (`Sequence[TaskGroup]`): groups whose documents are their gold documents.
        documents_per_task (`int`): documents per group after padding.
        embedder: the bank's `SentenceTransformer`.
        pool (`Sequence[str]`, *optional*): documents to draw from; defaults to every group's documents.
    """
    probes = [Task(group.documents, " ".join(t.question for t in group.tasks), "-", id=group.id) for group in groups]
    pool = list(dict.fromkeys(d for group in groups for d in group.documents)) if pool is None else pool
    padded = with_hard_distractors(probes, documents_per_task, embedder, pool)
    return [TaskGroup(probe.documents, group.tasks, group.id) for probe, group in zip(padded, groups, strict=True)]


def as_training_items(data: Any) -> list[Task | TaskGroup]:
    """What [`ReGradTrainer`] trains on: [`TaskGroup`]s as they are, anything else through [`as_tasks`]."""
    if isinstance(data, Sequence) and any(isinstance(item, TaskGroup) for item in data):
        return [item if isinstance(item, TaskGroup) else as_tasks([item])[0] for item in data]
    return as_tasks(data)


def count_questions(items: Iterable[Task | TaskGroup]) -> int:
    """Question-answer pairs in `items` (a group counts each of its questions)."""
    return sum(len(item.tasks) if isinstance(item, TaskGroup) else 1 for item in items)

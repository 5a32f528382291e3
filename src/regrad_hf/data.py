"""Meta-learning tasks and their loaders: a task is (documents, question, answer).

Loaders read SQuAD-style JSON, HotpotQA, TOFU and a JSONL format of our own. [`TaskCollator`] turns tasks into
the tensors [`ReGradTrainer`] needs.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .deltas import check_documents, tokenize_document
from .errors import ReGradValueError
from .prompting import PromptTemplate

# Article indices of `squad_dev_articles_00-39.json` (shared/data): meta-train, dev and test share no article.
SQUAD_SPLITS: dict[str, range] = {"train": range(0, 30), "dev": range(30, 35), "test": range(35, 40)}


@dataclass(frozen=True)
class Task:
    """One meta-learning or evaluation example.

    Args:
        documents (`tuple[str, ...]`): the documents whose gradients are injected.
        question (`str`): asked without the documents in the prompt (blind) or with them (ICL).
        answer (`str`): the target answer (training).
        answers (`tuple[str, ...]`): every acceptable answer (EM/F1); defaults to `(answer,)`.
        id (`str`, *optional*): an identifier.
    """

    documents: tuple[str, ...]
    question: str
    answer: str
    answers: tuple[str, ...] = ()
    id: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "documents", tuple(self.documents))
        check_documents(self.documents)
        if not isinstance(self.question, str) or not self.question.strip():
            raise ReGradValueError(f"task {self.id!r} has an empty question")
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise ReGradValueError(f"task {self.id!r} has an empty answer")
        object.__setattr__(self, "answers", tuple(self.answers) or (self.answer,))

    def to_dict(self) -> dict[str, Any]:
        return {
            "documents": list(self.documents),
            "question": self.question,
            "answer": self.answer,
            "answers": list(self.answers),
            "id": self.id,
        }


def load_squad(path: str | os.PathLike, articles: Iterable[int] | str | None = None) -> list[Task]:
    """SQuAD v1.1-style JSON: each paragraph is a document, each of its questions a task.

    Args:
        path: the JSON file (`data[].paragraphs[].context/qas`).
        articles (`Iterable[int]` or `str`, *optional*): article indices to keep, or a name of [`SQUAD_SPLITS`];
            `None` keeps all.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    if isinstance(articles, str):
        if articles not in SQUAD_SPLITS:
            raise ReGradValueError(f"unknown SQuAD split {articles!r}; use one of {sorted(SQUAD_SPLITS)}")
        articles = SQUAD_SPLITS[articles]
    keep = range(len(data)) if articles is None else list(articles)
    tasks = []
    for index in keep:
        for paragraph in data[index]["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = tuple(dict.fromkeys(a["text"].strip() for a in qa["answers"] if a["text"].strip()))
                if answers:
                    tasks.append(Task((paragraph["context"],), qa["question"], answers[0], answers, qa.get("id")))
    return tasks


def load_hotpotqa(path: str | os.PathLike, distractors: bool = False) -> list[Task]:
    """HotpotQA (original schema, JSONL or JSON list). Documents are the supporting paragraphs, or all ten
    paragraphs (supporting and distractors) with `distractors=True`, each as `"Title: sentence sentence ..."`."""
    text = Path(path).read_text(encoding="utf-8")
    is_list = text.lstrip().startswith("[")
    records = json.loads(text) if is_list else [json.loads(line) for line in text.splitlines() if line.strip()]
    tasks, skipped = [], 0
    for record in records:
        supporting = {title for title, _ in record["supporting_facts"]}
        if not supporting & {title for title, _ in record["context"]}:
            skipped += 1  # the record's context lacks its own supporting paragraphs: no gold document to inject
            continue
        documents = [
            f"{title}: {''.join(sentences).strip()}"
            for title, sentences in record["context"]
            if distractors or title in supporting
        ]
        tasks.append(Task(tuple(documents), record["question"], record["answer"], id=record.get("_id")))
    if skipped:
        warnings.warn(
            f"{path}: skipped {skipped} records whose context has none of their supporting paragraphs", stacklevel=2
        )
    return tasks


def load_tofu(path: str | os.PathLike, authors: Iterable[int] | None = None) -> list[Task]:
    """TOFU fictitious-author QA (JSONL of `author_idx`, `question`, `answer`).

    TOFU has no source documents, so each author's document is built from that author's facts: all of the
    author's answers (full sentences) joined in file order. Every question of the author is a task on that one
    document; the answer sentence is therefore in the document.
    """
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    keep = None if authors is None else set(authors)
    by_author: dict[int, list[dict]] = {}
    for row in rows:
        if keep is None or row["author_idx"] in keep:
            by_author.setdefault(row["author_idx"], []).append(row)
    tasks = []
    for author, qas in by_author.items():
        document = " ".join(qa["answer"].strip() for qa in qas)
        for number, qa in enumerate(qas):
            tasks.append(Task((document,), qa["question"], qa["answer"], id=f"tofu-{author}-{number}"))
    return tasks


def load_jsonl(path: str | os.PathLike) -> list[Task]:
    """Our own format: one JSON object per line with `documents` (list of strings), `question`, `answer`, and
    optionally `answers` (all acceptable answers) and `id`."""
    tasks = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            tasks.append(
                Task(
                    tuple(record["documents"]),
                    record["question"],
                    record["answer"],
                    tuple(record.get("answers", ())),
                    record.get("id"),
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ReGradValueError(f"{path} line {number} is not a task: {error!r}") from error
    return tasks


LOADERS = {"squad": load_squad, "hotpotqa": load_hotpotqa, "tofu": load_tofu, "jsonl": load_jsonl}


def question_prompt(
    tokenizer, question: str, documents: Sequence[str] | None = None, prompt: PromptTemplate | None = None
) -> str:
    """The prompt a question is asked with: the question alone (blind), or with the documents (ICL), written with
    `prompt` (defaults to [`PromptTemplate`]'s defaults, those of a new [`ReGradConfig`]) through the tokenizer's
    chat template when it has one."""
    return (prompt or PromptTemplate()).build(tokenizer, question, documents)


def answer_suffix(tokenizer) -> str:
    """What ends an answer: the end-of-turn/eos token, so a trained model learns to stop."""
    return tokenizer.eos_token or ""


@dataclass
class TaskCollator:
    """Tokenises tasks for [`ReGradTrainer`]: `{"tasks": [one dict of tensors per task]}`.

    Each task dict holds `document_ids`/`document_mask` (the documents, right-padded, truncated to
    `max_document_tokens`) and `input_ids`/`labels` (prompt + answer; labels are -100 on the prompt).

    Args:
        tokenizer: the model's tokenizer.
        max_document_tokens (`int`): document truncation length for the inner step.
        max_answer_tokens (`int`): answers longer than this raise (they would dominate the outer loss).
        blind (`bool`): `True` asks the question alone; `False` also puts the documents in the prompt.
        documents_per_task (`int`): when larger than a task's own documents, other tasks' documents are added
            as distractors (sampled from `distractor_pool`), as top-k retrieval would.
        distractor_pool (`Sequence[str]`): documents to sample distractors from.
        seed (`int`): seed of the distractor sampling. A task's distractors depend only on the seed and the task
            (not on what was collated before), so a resumed run sees the same batches as an uninterrupted one.
        prompt ([`PromptTemplate`]): the question prompt; pass the learner's (`PromptTemplate.from_config(config)`,
            as [`ReGradTrainer`] does) so that it is trained the way it is served. Defaults to a new config's.
    """

    tokenizer: Any
    max_document_tokens: int = 512
    max_answer_tokens: int = 48
    blind: bool = True
    documents_per_task: int = 1
    distractor_pool: Sequence[str] = ()
    seed: int = 0
    prompt: PromptTemplate = field(default_factory=PromptTemplate)

    def __post_init__(self):
        if self.documents_per_task < 1:
            raise ReGradValueError("documents_per_task must be at least 1")

    def __call__(self, tasks: Sequence[Task | dict]) -> dict[str, list[dict[str, torch.Tensor]]]:
        return {"tasks": [self.encode(task if isinstance(task, Task) else Task(**task)) for task in tasks]}

    def encode(self, task: Task) -> dict[str, torch.Tensor]:
        documents = list(task.documents) + self._distractors(task)
        tokenizer = self.tokenizer
        encoded_documents = [tokenize_document(tokenizer, d, self.max_document_tokens) for d in documents]
        length = max(len(ids) for ids in encoded_documents)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        document_ids = torch.full((len(encoded_documents), length), pad, dtype=torch.long)
        document_mask = torch.zeros((len(encoded_documents), length), dtype=torch.long)
        for row, ids in enumerate(encoded_documents):
            document_ids[row, : len(ids)] = torch.tensor(ids)
            document_mask[row, : len(ids)] = 1

        prompt = self.prompt.build(tokenizer, task.question, None if self.blind else task.documents)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(task.answer.strip() + answer_suffix(tokenizer), add_special_tokens=False)["input_ids"]
        if len(answer_ids) > self.max_answer_tokens:
            raise ReGradValueError(
                f"task {task.id!r}: the answer has {len(answer_ids)} tokens, more than max_answer_tokens="
                f"{self.max_answer_tokens}"
            )
        input_ids = torch.tensor([prompt_ids + answer_ids])
        labels = input_ids.clone()
        labels[0, : len(prompt_ids)] = -100
        return {"document_ids": document_ids, "document_mask": document_mask, "input_ids": input_ids, "labels": labels}

    def _distractors(self, task: Task) -> list[str]:
        missing = self.documents_per_task - len(task.documents)
        if missing <= 0:
            return []
        candidates = [d for d in self.distractor_pool if d not in task.documents]
        if len(candidates) < missing:
            raise ReGradValueError(f"need {missing} distractor documents, the pool has {len(candidates)}")
        # A str seed is hashed with SHA-512: the same draw in every process and every session.
        return random.Random(f"{self.seed}\0{task.id}\0{task.question}").sample(candidates, missing)

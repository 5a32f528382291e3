"""Meta-learning tasks and their loaders: a task is (documents, question, answer).

Loaders read SQuAD, HotpotQA, TOFU and a JSONL format of our own, from local files, from the Hub
(`datasets.load_dataset`, mapping each dataset's Hub schema) or from a `datasets.Dataset` already loaded.
[`regrad_hf.collator.TaskCollator`] turns tasks into the tensors [`ReGradTrainer`] needs.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .deltas import check_documents
from .errors import ReGradValueError
from .sources import DATASET_SUFFIXES, Rows, is_dataset, is_dataset_dict, read_rows, read_text_file

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


@dataclass(frozen=True)
class HubDataset:
    """Where a format's data is on the Hub: repo id, configuration and the split the loaders take by default."""

    repo_id: str
    config: str | None
    split: str


# The Hub datasets whose schemas the loaders map (the shared files of the project use the same data).
HUB_DATASETS: dict[str, HubDataset] = {
    "squad": HubDataset("rajpurkar/squad", None, "validation"),
    "hotpotqa": HubDataset("hotpotqa/hotpot_qa", "distractor", "validation"),
    "tofu": HubDataset("locuslab/TOFU", "full", "train"),
}
# TOFU's Hub rows carry no author index: each author has 20 consecutive questions.
TOFU_QUESTIONS_PER_AUTHOR = 20


def _rows(source, format: str, config: str | None, split: str | None, read_file) -> Rows:
    hub = HUB_DATASETS[format]
    is_hub_default = isinstance(source, str) and source == hub.repo_id
    return read_rows(
        source,
        config=config if config is not None or not is_hub_default else hub.config,
        split=split if split is not None or not is_hub_default else hub.split,
        default_split=hub.split,
        read_file=read_file,
    )


def _json_records(path: Path) -> list[dict]:
    """A JSON list or JSONL file as a list of records, with the line of any malformed record."""
    text = read_text_file(path)
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ReGradValueError(f"{path} is not valid JSON or JSONL: {error}") from error


def _squad_json_rows(path: Path) -> list[dict]:
    """SQuAD v1.1 JSON (`data[].paragraphs[].context/qas`) flattened into the Hub's rows."""
    try:
        data = json.loads(read_text_file(path))["data"]
        return [
            {
                "id": qa.get("id"),
                "title": article.get("title", str(index)),
                "context": paragraph["context"],
                "question": qa["question"],
                "answers": {"text": [a["text"] for a in qa["answers"]]},
            }
            for index, article in enumerate(data)
            for paragraph in article["paragraphs"]
            for qa in paragraph["qas"]
        ]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ReGradValueError(f"{path} is not SQuAD v1.1 JSON (data[].paragraphs[].context/qas): {error!r}") from error


def load_squad(
    source: Any, articles: Iterable[int] | str | None = None, *, config: str | None = None, split: str | None = None
) -> list[Task]:
    """SQuAD v1.1: each paragraph is a document, each of its questions a task.

    Args:
        source: SQuAD v1.1 JSON (`data[].paragraphs[].context/qas`), the Hub dataset `"rajpurkar/squad"` or data in
            its schema (`title`, `context`, `question`, `answers.text`: a `datasets.Dataset`, a dataset folder or
            file). See [`regrad_hf.sources.read_rows`].
        articles (`Iterable[int]` or `str`, *optional*): article indices to keep (articles in order of first
            appearance), or a name of [`SQUAD_SPLITS`] (defined on the validation split); `None` keeps all.
        config, split (`str`, *optional*): of a Hub dataset or `DatasetDict`; the default split is `validation`.
    """
    rows = _rows(source, "squad", config, split, _squad_json_rows)
    if isinstance(articles, str):
        if articles not in SQUAD_SPLITS:
            raise ReGradValueError(f"unknown SQuAD split {articles!r}; use one of {sorted(SQUAD_SPLITS)}")
        articles = SQUAD_SPLITS[articles]
    titles = list(dict.fromkeys(_column(rows, "title", "SQuAD")))
    keep = set(titles) if articles is None else {titles[i] for i in articles if i < len(titles)}
    tasks = []
    for row in rows:
        if row["title"] in keep:
            answers = tuple(dict.fromkeys(text.strip() for text in row["answers"]["text"] if text.strip()))
            if answers:
                tasks.append(Task((row["context"],), row["question"], answers[0], answers, row.get("id")))
    return tasks


def _column(rows: Rows, name: str, format: str) -> list:
    if is_dataset(rows):
        if name not in rows.column_names:
            raise ReGradValueError(f"the dataset has no {name!r} column for {format} (it has {rows.column_names})")
        return list(rows[name])
    try:
        return [row[name] for row in rows]
    except KeyError as error:
        raise ReGradValueError(f"a {format} record has no {name!r} field") from error


def _hotpotqa_record(record: Mapping) -> tuple[set[str], list[tuple[str, list[str]]], str | None]:
    """(supporting titles, (title, sentences) paragraphs, id) of a record in the original or the Hub schema."""
    facts, context = record["supporting_facts"], record["context"]
    supporting = set(facts["title"]) if isinstance(facts, Mapping) else {title for title, _ in facts}
    if isinstance(context, Mapping):  # Hub: {"title": [...], "sentences": [[...], ...]}
        paragraphs = list(zip(context["title"], context["sentences"], strict=True))
    else:  # original: [[title, [sentences]], ...]
        paragraphs = [(title, sentences) for title, sentences in context]
    return supporting, paragraphs, record.get("id", record.get("_id"))


def hotpotqa_rows(source: Any, *, config: str | None = None, split: str | None = None) -> Rows:
    """The HotpotQA records of `source` (see [`load_hotpotqa`]), unparsed."""
    return _rows(source, "hotpotqa", config, split, _json_records)


def hotpotqa_paragraphs(record: Mapping) -> list[tuple[str, str]]:
    """A HotpotQA record's ten paragraphs (original or Hub schema) as `(title, "Title: sentence ...")` pairs."""
    try:
        return [(title, f"{title}: {''.join(sentences).strip()}") for title, sentences in _hotpotqa_record(record)[1]]
    except (KeyError, TypeError, ValueError) as error:
        raise ReGradValueError(f"a record is not in the HotpotQA schema: {error!r}") from error


def load_hotpotqa(
    source: Any,
    distractors: bool = False,
    *,
    config: str | None = None,
    split: str | None = None,
    records: Iterable[int] | None = None,
) -> list[Task]:
    """HotpotQA: the original schema (JSONL or JSON list), the Hub dataset `"hotpotqa/hotpot_qa"` (configuration
    `distractor`, split `validation` by default) or data in its schema. Documents are the supporting paragraphs, or
    all ten paragraphs (supporting and distractors) with `distractors=True`, each as `"Title: sentence ..."`.
    `records` keeps only the records at these indices, in this order (e.g. a split of [`regrad_hf.tasks`])."""
    rows = hotpotqa_rows(source, config=config, split=split)
    if records is not None:
        indices = list(records)
        if any(not 0 <= index < len(rows) for index in indices):
            raise ReGradValueError(f"{source}: record indices must be in [0, {len(rows)})")
        rows = [rows[index] for index in indices]
    tasks, skipped = [], 0
    for record in rows:
        try:
            supporting, paragraphs, task_id = _hotpotqa_record(record)
            question, answer = record["question"], record["answer"]
        except (KeyError, TypeError, ValueError) as error:
            raise ReGradValueError(f"{source}: a record is not in the HotpotQA schema: {error!r}") from error
        if not supporting & {title for title, _ in paragraphs}:
            skipped += 1  # the record's context lacks its own supporting paragraphs: no gold document to inject
            continue
        documents = [
            f"{title}: {''.join(sentences).strip()}"
            for title, sentences in paragraphs
            if distractors or title in supporting
        ]
        tasks.append(Task(tuple(documents), question, answer, id=task_id))
    if skipped:
        warnings.warn(
            f"{source}: skipped {skipped} records whose context has none of their supporting paragraphs", stacklevel=2
        )
    return tasks


def load_tofu(
    source: Any, authors: Iterable[int] | None = None, *, config: str | None = None, split: str | None = None
) -> list[Task]:
    """TOFU fictitious-author QA: JSONL of `author_idx`, `question`, `answer`, or the Hub dataset `"locuslab/TOFU"`
    (configuration `full`), whose rows have no author index: the author of row `i` is `i // 20`.

    TOFU has no source documents, so each author's document is built from that author's facts: all of the
    author's answers (full sentences) joined in file order. Every question of the author is a task on that one
    document; the answer sentence is therefore in the document.
    """
    rows = _rows(source, "tofu", config, split, _json_records)
    keep = None if authors is None else set(authors)
    by_author: dict[int, list[Mapping]] = {}
    for number, row in enumerate(rows):
        author = row.get("author_idx")
        author = number // TOFU_QUESTIONS_PER_AUTHOR if author is None else author
        if keep is None or author in keep:
            by_author.setdefault(author, []).append(row)
    tasks = []
    for author, qas in by_author.items():
        document = " ".join(qa["answer"].strip() for qa in qas)
        for number, qa in enumerate(qas):
            tasks.append(Task((document,), qa["question"], qa["answer"], id=f"tofu-{author}-{number}"))
    return tasks


def task_from_record(record: Mapping) -> Task:
    """A [`Task`] from a mapping with `documents` (list of strings), `question`, `answer`, and optionally `answers`
    and `id`; other keys are ignored (e.g. a dataset's extra columns)."""
    missing = [key for key in ("documents", "question", "answer") if key not in record]
    if missing:
        raise ReGradValueError(f"a task record has no {', '.join(map(repr, missing))} (it has {sorted(record)})")
    documents = record["documents"]
    if isinstance(documents, str):
        raise ReGradValueError("a task's documents must be a list of strings, not a single string")
    return Task(
        tuple(documents), record["question"], record["answer"], tuple(record.get("answers") or ()), record.get("id")
    )


def load_jsonl(source: Any, *, split: str | None = None) -> list[Task]:
    """Our own format: one JSON object per line with `documents` (list of strings), `question`, `answer`, and
    optionally `answers` (all acceptable answers) and `id`; or a `datasets.Dataset` (or dataset folder, Hub
    dataset) with those columns."""
    is_lines = isinstance(source, (str, os.PathLike)) and Path(source).is_file()
    if not is_lines or Path(source).suffix.lower() in DATASET_SUFFIXES:
        return [task_from_record(row) for row in read_rows(source, split=split, default_split="train")]
    tasks = []
    for number, line in enumerate(read_text_file(source).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            tasks.append(task_from_record(json.loads(line)))
        except (json.JSONDecodeError, TypeError, ReGradValueError) as error:
            raise ReGradValueError(f"{source} line {number} is not a task: {error}") from error
    return tasks


LOADERS = {"squad": load_squad, "hotpotqa": load_hotpotqa, "tofu": load_tofu, "jsonl": load_jsonl}


def as_tasks(data: Any) -> list[Task]:
    """Tasks from what a user hands to [`ReGradTrainer`]: [`Task`]s, mappings, or a `datasets.Dataset` with
    `documents`/`question`/`answer` columns (or in the SQuAD or HotpotQA Hub schema, recognised by its columns)."""
    if is_dataset_dict(data):
        raise ReGradValueError("got a DatasetDict: pass one of its splits, e.g. dataset['train']")
    if is_dataset(data):
        columns = set(data.column_names)
        if {"context", "answers", "title"} <= columns:
            return load_squad(data)
        if {"supporting_facts", "context"} <= columns:
            return load_hotpotqa(data)
        return [task_from_record(row) for row in data]
    return [task if isinstance(task, Task) else task_from_record(task) for task in data]


def dataset_documents(
    documents: Any, ids: Sequence[str] | None, text_column: str = "text", id_column: str | None = None
) -> tuple[Sequence[str], Sequence[str] | None]:
    """`(documents, ids)` unchanged, unless `documents` is a `datasets.Dataset`/`DatasetDict`: then its
    `text_column` and `id_column` (explicit `ids` win), for [`GradientBank.build`]."""
    if not (is_dataset(documents) or is_dataset_dict(documents)):
        return documents, ids
    texts, dataset_ids, _ = documents_from(documents, text_column, id_column)
    return texts, dataset_ids if ids is None else ids


def documents_from(
    data: Any, text_column: str = "text", id_column: str | None = None, metadata_columns: Sequence[str] | None = None
) -> tuple[list[str], list[str] | None, list[dict] | None]:
    """Documents, ids and metadata from a `datasets.Dataset` (or a Hub dataset name, dataset folder or file).

    Args:
        data: the rows (see [`regrad_hf.sources.read_rows`]); a `DatasetDict` needs one split.
        text_column (`str`, defaults to `"text"`): the column holding each document's text.
        id_column (`str`, *optional*): the column of unique ids (converted to strings); default `"0"`, `"1"`, ...
        metadata_columns (`Sequence[str]`, *optional*): columns stored as each document's metadata.

    Returns:
        `(texts, ids, metadata)`, as [`GradientBank.build`] takes them.
    """
    rows = read_rows(data, default_split="train")
    texts = _column(rows, text_column, "documents")
    ids = [str(value) for value in _column(rows, id_column, "documents")] if id_column else None
    metadata = None
    if metadata_columns:
        values = {name: _column(rows, name, "documents") for name in metadata_columns}
        metadata = [{name: values[name][row] for name in metadata_columns} for row in range(len(texts))]
    return list(texts), ids, metadata

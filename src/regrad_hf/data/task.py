"""Meta-learning tasks and their loaders: a task is (documents, question, answer).

Loaders read SQuAD, HotpotQA, TOFU and a JSONL format of our own, from local files, from the Hub
(`datasets.load_dataset`, mapping each dataset's Hub schema) or from a `datasets.Dataset` already loaded.
[`regrad_hf.data.collator.TaskCollator`] turns tasks into the tensors [`ReGradTrainer`] needs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adaptation.deltas import check_documents
from ..errors import ReGradTypeError, ReGradValueError
from .records import (
    describe,
    field,
    identifier,
    indices,
    json_lines,
    json_records,
    mapping,
    parse_json,
    string,
    strings,
)
from .schemas import hotpotqa_record, squad_json_rows, squad_row
from .sources import (
    DATASET_SUFFIXES,
    Rows,
    is_dataset,
    is_dataset_dict,
    is_iterable_dataset,
    read_rows,
    read_text_file,
)

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
        # Every loader ends here, so this is where a field of the wrong type is caught, whatever the source.
        object.__setattr__(self, "id", identifier(self.id, "a task's id"))
        name = f"task {self.id!r}"
        for label, value in (("documents", self.documents), ("answers", self.answers)):
            # tuple() of a string or a mapping would silently split it into characters or keys.
            if isinstance(value, (str, bytes, Mapping, Set)) or not isinstance(value, Iterable):
                raise ReGradValueError(f"{name}: {label} must be a list of strings, not a {type(value).__name__}")
        object.__setattr__(self, "documents", tuple(self.documents))
        check_documents(self.documents)
        for label in ("question", "answer"):
            _check_text(getattr(self, label), f"{name} has an empty {label}", f"{name}: the {label}")
        answers = tuple(self.answers) or (self.answer,)
        for index, text in enumerate(answers):
            _check_text(text, f"{name}: answer {index} of answers is empty", f"{name}: answer {index} of answers")
        object.__setattr__(self, "answers", answers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "documents": list(self.documents),
            "question": self.question,
            "answer": self.answer,
            "answers": list(self.answers),
            "id": self.id,
        }


def _check_text(value: Any, empty: str, where: str) -> None:
    string(value, where)
    if not value.strip():
        raise ReGradValueError(empty)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate: no tokenizer can encode it
        raise ReGradValueError(f"{where} is not valid Unicode text: {error}") from None


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
    """A JSON list or JSONL file as a list of records (objects), with the line of any malformed record."""
    return json_records(read_text_file(path), path)


def _squad_json_rows(path: Path) -> list[dict]:
    return squad_json_rows(parse_json(read_text_file(path), str(path)), str(path))


def load_squad(
    source: Any, articles: Iterable[int] | str | None = None, *, config: str | None = None, split: str | None = None
) -> list[Task]:
    """SQuAD v1.1: each paragraph is a document, each of its questions a task.

    Args:
        source: SQuAD v1.1 JSON (`data[].paragraphs[].context/qas`), the Hub dataset `"rajpurkar/squad"` or data in
            its schema (`title`, `context`, `question`, `answers.text`: a `datasets.Dataset`, a dataset folder or
            file). See [`regrad_hf.data.sources.read_rows`].
        articles (`Iterable[int]` or `str`, *optional*): article indices to keep (articles in order of first
            appearance), or a name of [`SQUAD_SPLITS`] (defined on the validation split); `None` keeps all.
        config, split (`str`, *optional*): of a Hub dataset or `DatasetDict`; the default split is `validation`.
    """
    if isinstance(articles, str):
        if articles not in SQUAD_SPLITS:
            raise ReGradValueError(f"unknown SQuAD split {articles!r}; use one of {sorted(SQUAD_SPLITS)}")
        articles = SQUAD_SPLITS[articles]
    articles = None if articles is None else indices(articles, "SQuAD article")
    rows = _rows(source, "squad", config, split, _squad_json_rows)
    name = describe(source)
    checked = [squad_row(row, f"{name} row {number}") for number, row in enumerate(rows)]
    titles = list(dict.fromkeys(row[0] for row in checked))
    keep = set(titles) if articles is None else {titles[i] for i in articles if i < len(titles)}
    tasks = []
    for title, context, question, texts, task_id in checked:
        if title in keep:
            answers = tuple(dict.fromkeys(text.strip() for text in texts if text.strip()))
            if answers:
                tasks.append(Task((context,), question, answers[0], answers, task_id))
    return tasks


def _column(rows: Rows, name: str, format: str) -> list:
    if is_dataset(rows):
        if name not in rows.column_names:
            raise ReGradValueError(f"the dataset has no {name!r} column for {format} (it has {rows.column_names})")
        return list(rows[name])
    return [field(mapping(row, f"{format} row {n}"), name, f"{format} row {n}") for n, row in enumerate(rows)]


def hotpotqa_rows(source: Any, *, config: str | None = None, split: str | None = None) -> Rows:
    """The HotpotQA records of `source` (see [`load_hotpotqa`]), unparsed."""
    return _rows(source, "hotpotqa", config, split, _json_records)


def hotpotqa_paragraphs(record: Mapping, where: str = "a HotpotQA record") -> list[tuple[str, str]]:
    """A HotpotQA record's ten paragraphs (original or Hub schema) as `(title, "Title: sentence ...")` pairs; a
    malformed record raises [`ReGradValueError`] naming `where` and the field."""
    return [(title, f"{title}: {''.join(sentences).strip()}") for title, sentences in hotpotqa_record(record, where)[1]]


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
    `records` keeps only the records at these indices, in this order (e.g. a split of [`regrad_hf.data.task_sets`])."""
    rows = hotpotqa_rows(source, config=config, split=split)
    numbers = (
        range(len(rows)) if records is None else indices(records, f"{describe(source)}: HotpotQA record", len(rows))
    )
    tasks, skipped = [], 0
    for number in numbers:
        where = f"{describe(source)} record {number}"
        supporting, paragraphs, task_id = hotpotqa_record(rows[number], where)
        question, answer = field(rows[number], "question", where), field(rows[number], "answer", where)
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
            f"{describe(source)}: skipped {skipped} records whose context has none of their supporting paragraphs",
            stacklevel=2,
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
    keep = None if authors is None else set(indices(authors, "TOFU author"))
    rows = _rows(source, "tofu", config, split, _json_records)
    by_author: dict[int, list[tuple[str, str]]] = {}
    for number, row in enumerate(rows):
        where = f"{describe(source)} row {number}"
        row = mapping(row, where)
        author = row.get("author_idx")
        if author is None:
            author = number // TOFU_QUESTIONS_PER_AUTHOR
        elif not isinstance(author, int) or isinstance(author, bool):
            raise ReGradValueError(f"{where}.author_idx must be an integer, not {author!r}")
        qa = tuple(string(field(row, key, where), f"{where}.{key}") for key in ("question", "answer"))
        if keep is None or author in keep:
            by_author.setdefault(author, []).append(qa)
    tasks = []
    for author, qas in by_author.items():
        document = " ".join(answer.strip() for _, answer in qas)
        for number, (question, answer) in enumerate(qas):
            tasks.append(Task((document,), question, answer, id=f"tofu-{author}-{number}"))
    return tasks


def task_from_record(record: Mapping, where: str = "a task record") -> Task:
    """A [`Task`] from a mapping with `documents` (list of strings), `question`, `answer`, and optionally `answers`
    and `id`; other keys are ignored (e.g. a dataset's extra columns). A malformed record raises
    [`ReGradValueError`] naming `where` (e.g. `tasks.jsonl line 3`) and the field."""
    record = mapping(record, where)
    missing = [key for key in ("documents", "question", "answer") if key not in record]
    if missing:
        raise ReGradValueError(f"{where} has no {', '.join(map(repr, missing))} (it has {sorted(map(str, record))})")
    answers = record.get("answers")
    try:
        return Task(
            tuple(strings(record["documents"], f"{where}: documents")),
            string(record["question"], f"{where}: question"),
            string(record["answer"], f"{where}: answer"),
            () if answers is None else tuple(strings(answers, f"{where}: answers")),
            identifier(record.get("id"), f"{where}: id"),
        )
    except ReGradValueError as error:
        message = str(error)
        raise ReGradValueError(message if message.startswith(where) else f"{where}: {message}") from None


def load_jsonl(source: Any, *, split: str | None = None) -> list[Task]:
    """Our own format: one JSON object per line with `documents` (list of strings), `question`, `answer`, and
    optionally `answers` (all acceptable answers) and `id`; or a `datasets.Dataset` (or dataset folder, Hub
    dataset) with those columns."""
    is_lines = isinstance(source, (str, os.PathLike)) and Path(source).is_file()
    if not is_lines or Path(source).suffix.lower() in DATASET_SUFFIXES:
        rows = read_rows(source, split=split, default_split="train")
        return [task_from_record(row, f"{describe(source)} row {number}") for number, row in enumerate(rows)]
    lines = json_lines(read_text_file(source), source)
    return [task_from_record(record, f"{source} line {number}") for number, record in lines]


LOADERS = {"squad": load_squad, "hotpotqa": load_hotpotqa, "tofu": load_tofu, "jsonl": load_jsonl}


def as_tasks(data: Any) -> list[Task]:
    """Tasks from what a user hands to [`ReGradTrainer`]: [`Task`]s, mappings, or a `datasets.Dataset` (or a
    streamed `IterableDataset`) with `documents`/`question`/`answer` columns (or in the SQuAD or HotpotQA Hub schema,
    recognised by its columns)."""
    if is_dataset_dict(data) or (is_iterable_dataset(data) and isinstance(data, Mapping)):
        raise ReGradValueError("got a DatasetDict: pass one of its splits, e.g. dataset['train']")
    columns = None
    if is_iterable_dataset(data):
        data = read_rows(data)  # streamed in batches into a list of rows
        columns = set(data[0]) if data else set()
    elif is_dataset(data):
        columns = set(data.column_names)
    if columns is not None:
        if {"context", "answers", "title"} <= columns:
            return load_squad(data)
        if {"supporting_facts", "context"} <= columns:
            return load_hotpotqa(data)
        return [task_from_record(row, f"dataset row {number}") for number, row in enumerate(data)]
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise ReGradTypeError(
            f"tasks must be a list of Tasks or mappings, or a datasets.Dataset, not {type(data).__name__}"
        )
    return [task if isinstance(task, Task) else task_from_record(task, f"task {n}") for n, task in enumerate(data)]


def dataset_documents(
    documents: Any,
    ids: Sequence[str] | None,
    metadata: Sequence[Mapping[str, Any]] | None,
    text_column: str = "text",
    id_column: str | None = None,
) -> tuple[Sequence[str], Sequence[str] | None, Sequence[Mapping[str, Any]] | None]:
    """`(documents, ids, metadata)` unchanged, unless `documents` is a `datasets.Dataset`, `DatasetDict` or
    (streamed) `IterableDataset`: then its `text_column`, its `id_column` and its other columns as each document's
    metadata (explicit `ids` and `metadata` win), for [`GradientBank.build`] and [`GradientBank.add`]."""
    if not (is_dataset(documents) or is_dataset_dict(documents) or is_iterable_dataset(documents)):
        return documents, ids, metadata
    rows = read_rows(documents, default_split="train")
    names = rows.column_names if is_dataset(rows) else list(rows[0]) if rows else []
    extra = [name for name in names if name not in (text_column, id_column)] if metadata is None else None
    texts, dataset_ids, dataset_metadata = documents_from(rows, text_column, id_column, extra)
    return texts, dataset_ids if ids is None else ids, dataset_metadata if metadata is None else metadata


def documents_from(
    data: Any, text_column: str = "text", id_column: str | None = None, metadata_columns: Sequence[str] | None = None
) -> tuple[list[str], list[str] | None, list[dict] | None]:
    """Documents, ids and metadata from a `datasets.Dataset` (or a Hub dataset name, dataset folder or file).

    Args:
        data: the rows (see [`regrad_hf.data.sources.read_rows`]); a `DatasetDict` needs one split.
        text_column (`str`, defaults to `"text"`): the column holding each document's text.
        id_column (`str`, *optional*): the column of unique ids (converted to strings); default `"0"`, `"1"`, ...
        metadata_columns (`Sequence[str]`, *optional*): columns stored as each document's metadata.

    Returns:
        `(texts, ids, metadata)`, as [`GradientBank.build`] takes them.
    """
    rows = read_rows(data, default_split="train")
    texts = _column(rows, text_column, "documents")
    ids = None
    if id_column:  # a missing id (None) would become the id "None"
        column = _column(rows, id_column, "documents")
        ids = [identifier(value, f"the {id_column!r} of row {n}") for n, value in enumerate(column)]
        if None in ids:
            raise ReGradValueError(f"row {ids.index(None)} has no {id_column!r} (null): every document needs an id")
    metadata = None
    if metadata_columns:
        values = {name: _column(rows, name, "documents") for name in metadata_columns}
        metadata = [{name: values[name][row] for name in metadata_columns} for row in range(len(texts))]
    return list(texts), ids, metadata

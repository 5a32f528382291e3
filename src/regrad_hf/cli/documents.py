"""The documents and questions the `regrad` verbs read: `build-bank --documents` (JSONL, text, or a dataset through
`datasets`) and `demo --questions` (JSONL)."""

from __future__ import annotations

from pathlib import Path

from ..data.records import identifier, json_lines, text_lines
from ..data.sources import read_text_file
from ..errors import ReGradValueError


def read_documents(
    path: Path, text_key: str = "text", id_key: str = "id"
) -> tuple[list[str], list[str] | None, list[dict] | None]:
    """Reads documents from JSONL (`{"text": ..., "id": ..., "metadata": {...}}` per line) or plain text (one per
    non-empty line). Ids are given on every line or on none.

    Args:
        path (`Path`): a `.jsonl` file, or any other file as plain text.
        text_key (`str`, defaults to `"text"`): the JSONL field of the texts (`build-bank --text-column`).
        id_key (`str`, defaults to `"id"`): the JSONL field of the ids (`build-bank --id-column`).

    Returns:
        `tuple`: the texts, the ids (`None` when no line has one) and the metadata (`None` for plain text).
    """
    text = read_text_file(path)
    if path.suffix != ".jsonl":
        return [line for _, line in text_lines(text)], None, None
    records, ids = [], []
    for number, record in json_lines(text, path):
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            raise ReGradValueError(
                f'{path} line {number} has no "{text_key}" string: write {{"{text_key}": "...", "{id_key}": "..."}}'
            )
        if not isinstance(record.get("metadata", {}), dict):
            raise ReGradValueError(f'{path} line {number}: "metadata" must be an object')
        ids.append(identifier(record.get(id_key), f"{path} line {number}: the id"))
        if (ids[0] is None) != (ids[-1] is None):  # else every given id would be dropped silently
            raise ReGradValueError(f"{path} line {number}: give an id on every line or on none")
        records.append(record)
    if not records:
        raise ReGradValueError(f"{path} holds no documents")
    texts = [record[text_key] for record in records]
    metadata = [record.get("metadata", {}) for record in records]
    return texts, None if ids[0] is None else ids, metadata


def load_documents(
    source: str, text_column: str | None = None, id_column: str | None = None, split: str | None = None
) -> tuple[list[str], list[str] | None, list[dict] | None]:
    """`build-bank --documents`: our JSONL or a text file (see [`read_documents`]); a Parquet/CSV file, a dataset
    folder or a Hub dataset name through `datasets`.

    Args:
        source (`str`): the file, folder or Hub dataset name.
        text_column (`str`, *optional*): the JSONL field or dataset column of the texts (default `"text"`).
        id_column (`str`, *optional*): the JSONL field (default `"id"`) or dataset column (default: none) of the ids.
        split (`str`, *optional*): for a dataset with several splits (default `"train"`).

    Raises:
        [`ReGradValueError`]: a column is named for a plain text file, which has none.
    """
    from ..data.sources import DATASET_SUFFIXES, read_rows
    from ..data.task import documents_from

    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() not in DATASET_SUFFIXES:
        if path.suffix != ".jsonl" and (text_column or id_column):
            option = "--text-column" if text_column else "--id-column"
            raise ReGradValueError(
                f"{option} names a JSONL field or a dataset column, but {source} is a text file (one document per "
                "line, no columns): drop the option, or give a .jsonl file"
            )
        return read_documents(path, text_column or "text", id_column or "id")
    rows = read_rows(source, split=split, default_split="train")
    return documents_from(rows, text_column or "text", id_column)


def read_questions(path: Path) -> list[dict]:
    """`regrad demo`'s questions: JSONL of `{"question": ..., "answer"?: ..., "doc_id"?: ...}`."""
    questions = []
    for number, record in json_lines(read_text_file(path), path):
        if not isinstance(record, dict) or not isinstance(record.get("question"), str) or not record["question"]:
            raise ReGradValueError(f'{path} line {number} has no "question" string')
        questions.append(record)
    return questions

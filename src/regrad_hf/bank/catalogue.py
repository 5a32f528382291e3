"""The catalogue of a bank: its documents' ids, texts and metadata, their index keys and where their gradients are.

It checks what is added (ids, metadata) and reads and writes `documents.jsonl`; it knows nothing of embeddings or
gradients.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ReGradKeyError, ReGradTypeError, ReGradValueError
from .schema import (
    MAX_ID_CHARS,
    check_json_value,
    check_metadata_size,
    check_record_line,
    checked_json,
    encode_record,
    validate_document,
)


@dataclass(frozen=True)
class Hit:
    """One retrieved document.

    Args:
        id (`str`): the document id.
        score (`float`): cosine similarity between the query and the document.
        text (`str`): the document text.
        metadata (`dict`): what was stored with the document.
    """

    id: str
    score: float
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Document:
    id: str
    text: str
    metadata: dict[str, Any]
    key: int
    # Where the gradient lives on disk; None while it is only in memory.
    shard: int | None = None
    row: int | None = None

    def hit(self, score: float) -> Hit:
        """The document as a [`Hit`], with its own copy of the metadata: a caller editing it changes nothing here."""
        return Hit(self.id, score, self.text, copy.deepcopy(self.metadata))


class Catalogue:
    """The documents of a bank, in insertion order, by id and by index key."""

    def __init__(self):
        self.documents: dict[str, Document] = {}
        self.ids_by_key: dict[int, str] = {}
        self.next_key = 0

    def __len__(self) -> int:
        return len(self.documents)

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and doc_id in self.documents  # never a TypeError for an unhashable value

    def __getitem__(self, doc_id: str) -> Document:
        return self.documents[doc_id]

    @property
    def ids(self) -> list[str]:
        return list(self.documents)

    def by_key(self, key: int) -> Document:
        return self.documents[self.ids_by_key[key]]

    def insert(self, document: Document) -> None:
        self.documents[document.id] = document
        self.ids_by_key[document.key] = document.id
        self.next_key = max(self.next_key, document.key + 1)

    def pop(self, doc_id: str) -> Document:
        document = self.documents.pop(doc_id)
        del self.ids_by_key[document.key]
        return document

    def clear(self) -> None:
        self.documents.clear()
        self.ids_by_key.clear()

    def check_known(self, ids: Iterable[str]) -> None:
        """Raises [`ReGradKeyError`] for ids not in the catalogue (and [`ReGradTypeError`] for ids not strings)."""
        wrong = [doc_id for doc_id in ids if not isinstance(doc_id, str)]
        if wrong:
            raise ReGradTypeError(f"document ids must be strings, got {type(wrong[0]).__name__} {wrong[0]!r:.40}")
        unknown = [doc_id for doc_id in ids if doc_id not in self.documents]
        if unknown:
            raise ReGradKeyError(f"unknown document ids: {unknown[:5]}")

    def new_ids(self, documents: Sequence[str], ids: Sequence[str] | None) -> list[str]:
        """Checks the ids of documents to add (or makes them: `"0"`, `"1"`, ... from the next index key)."""
        if ids is None:  # the next free numbers: a user's ids may be numbers too, and must never be replaced
            ids, key = [], self.next_key
            while len(ids) < len(documents):
                if str(key) not in self.documents:
                    ids.append(str(key))
                key += 1
            return ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise ReGradTypeError(f"ids must be a sequence of strings, got {type(ids).__name__}")
        ids = list(ids)
        if len(ids) != len(documents):
            raise ReGradValueError(f"got {len(ids)} ids for {len(documents)} documents")
        if not all(isinstance(doc_id, str) and doc_id for doc_id in ids):
            raise ReGradValueError("document ids must be non-empty strings")
        for doc_id in ids:
            check_json_value(doc_id, "a document id")
        if any(len(doc_id) > MAX_ID_CHARS for doc_id in ids):
            raise ReGradValueError(f"document ids must be at most {MAX_ID_CHARS} characters long")
        seen, duplicates = set(), set()
        for doc_id in ids:
            (duplicates if doc_id in seen else seen).add(doc_id)
        if duplicates:
            raise ReGradValueError(f"duplicate document ids: {sorted(duplicates)[:5]}")
        existing = sorted(seen & set(self.documents))
        if existing:
            raise ReGradValueError(f"the bank already holds documents with ids {existing[:5]}")
        return ids

    @staticmethod
    def check_metadata(documents: Sequence[str], metadata) -> list[dict[str, Any]]:
        """Checks the metadata of documents to add (`None`: empty): a sequence of one mapping per document. Returns
        copies, so that a caller editing its own objects later cannot put a value into the bank that it cannot save."""
        if metadata is None:
            return [{} for _ in documents]
        if isinstance(metadata, (str, bytes, bytearray, Mapping)) or not isinstance(metadata, Iterable):
            raise ReGradTypeError(
                f"metadata must be a sequence of one mapping per document, got {type(metadata).__name__}"
            )
        metadata = list(metadata)
        if len(metadata) != len(documents):
            raise ReGradValueError(f"got {len(metadata)} metadata entries for {len(documents)} documents")
        for index, entry in enumerate(metadata):
            if not isinstance(entry, Mapping):
                raise ReGradValueError(f"metadata of document {index} must be a mapping, got {type(entry).__name__}")
            try:
                json.dumps(dict(entry))
            except (TypeError, ValueError) as error:
                raise ReGradValueError(f"metadata of document {index} is not JSON-serialisable: {error}") from error
            check_json_value(dict(entry), f"metadata of document {index}")
            check_metadata_size(entry, f"metadata of document {index}")
        return [copy.deepcopy(dict(entry)) for entry in metadata]

    def read(self, data: bytes, path: Path, shard_sizes: list[int]) -> None:
        """Reads the bytes of `documents.jsonl`, one checked record per line; ids, index keys and shard rows must be
        unique."""
        places = set()
        lines = data.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        for number, line in enumerate(lines, start=1):
            check_record_line(line, f"{path} line {number}")
            record = checked_json(line, f"{path} line {number}")
            document = Document(**validate_document(record, path, number, shard_sizes))
            if document.id in self.documents or document.key in self.ids_by_key:
                duplicate = "id" if document.id in self.documents else "key"
                raise ReGradValueError(f"{path} line {number}: field {duplicate!r} repeats an earlier document")
            if (document.shard, document.row) in places:
                raise ReGradValueError(f"{path} line {number}: shard {document.shard} row {document.row} is taken")
            places.add((document.shard, document.row))
            self.insert(document)

    @staticmethod
    def id_list(ids: object, what: str) -> list[str]:
        """`ids` (one id or a sequence of them) as a list, type-checked, for `what` (e.g. "gather")."""
        if isinstance(ids, str):
            return [ids]
        if not isinstance(ids, Iterable) or isinstance(ids, (bytes, bytearray)):
            raise ReGradTypeError(f"{what} takes a document id or a sequence of them, got {type(ids).__name__}")
        return list(ids)

    def lines(self, placements: Mapping[str, tuple[int, int]]) -> bytes:
        """The text of `documents.jsonl`, with each document at its (shard, row) of `placements`."""
        lines = []
        for document in self.documents.values():
            shard, row = placements[document.id]
            record = {"id": document.id, "text": document.text, "metadata": document.metadata, "key": document.key}
            lines.append(encode_record({**record, "shard": shard, "row": row}) + b"\n")
        return b"".join(lines)

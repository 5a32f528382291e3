"""Checks of a bank's files before they are trusted: `bank_config.json` and `documents.jsonl` against their schema,
safetensors headers against size limits.

A bank may come from anyone (the Hub), so every field is checked for presence, type and range, with limits on
sizes that would otherwise exhaust memory (a 100 GB header, a billion-element "LoRA tensor"). Errors are
[`ReGradValueError`]s naming the file and the field.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..data.records import parse_json
from ..errors import ReGradFileError, ReGradValueError
from .index import MAX_CONNECTIVITY, MAX_EXPANSION
from .quantization import BANK_DTYPES, FLOAT_DTYPES, gradient_format

READABLE_FORMAT_VERSIONS = (1, 2, 3)
MAX_CONFIG_BYTES = 64 << 20
MAX_SAFETENSORS_HEADER_BYTES = 16 << 20
MAX_DOCUMENT_RECORD_BYTES = 64 << 20  # one line of documents.jsonl
MAX_TEXT_CHARS = 16 << 20
MAX_ID_CHARS = 1024
MAX_METADATA_BYTES = 1 << 20
MAX_DOCUMENTS = 1 << 40
MAX_TENSORS = 1 << 16
MAX_TENSOR_ELEMENTS = 1 << 28  # per document and tensor: 1 GiB in float32
MAX_TENSOR_RANK = 4
MAX_EMBEDDING_DIM = 1 << 16
MAX_STRING_CHARS = 4096  # names, hashes, identities
MAX_JSON_DEPTH = 64  # nesting of objects and lists, in any JSON a bank reads or writes
MAX_INT_DIGITS = 64  # digits of an integer in that JSON (Python refuses > 4300; a bank refuses long before)
_INT_LIMIT = 10**MAX_INT_DIGITS

SHARD_FILE = re.compile(r"gradients/shard-[0-9]{5,9}\.safetensors")
SHA256 = re.compile(r"[0-9a-f]{64}")
DOCUMENT_FIELDS = ("id", "text", "metadata", "key", "shard", "row")


def _fail(path: Path, field: str, problem: str) -> ReGradValueError:
    return ReGradValueError(f"{path}: field {field!r} {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(config: Mapping, key: str, path: Path, low: int, high: int, field: str | None = None) -> int:
    field = field or key
    if key not in config:
        raise _fail(path, field, "is missing")
    value = config[key]
    if not _is_int(value) or not low <= value <= high:
        raise _fail(path, field, f"must be an integer from {low} to {high}, got {_short(value)}")
    return value


def _str(config: Mapping, key: str, path: Path, pattern: re.Pattern | None = None, field: str | None = None) -> str:
    field = field or key
    if key not in config:
        raise _fail(path, field, "is missing")
    value = config[key]
    if not isinstance(value, str) or not value or len(value) > MAX_STRING_CHARS:
        raise _fail(path, field, f"must be a non-empty string of at most {MAX_STRING_CHARS} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise _fail(path, field, f"must match {pattern.pattern!r}, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_bytes(path: Path, limit: int, follow: bool = False) -> bytes:
    """The bytes of a bank file, opened without following a symlink (unless `follow`: a Hub cache's snapshot links
    to its blobs); files over `limit` bytes are refused."""
    try:
        descriptor = os.open(path, os.O_RDONLY | (0 if follow else getattr(os, "O_NOFOLLOW", 0)))
    except FileNotFoundError:
        raise ReGradValueError(f"bank file {path} is missing") from None
    except OSError as error:
        raise file_error(error, path, "read") from error
    with os.fdopen(descriptor, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise ReGradValueError(f"bank file {path} is {size} bytes, more than the limit of {limit}")
        try:
            return handle.read()
        except OSError as error:
            raise file_error(error, path, "read") from error


def file_error(error: OSError, path: Path, action: str) -> ReGradFileError:
    """An `OSError` of the operating system as a [`ReGradFileError`] that says what to do."""
    if error.errno == errno.ELOOP:
        return ReGradFileError(f"{path} is a symlink; a bank never follows symlinks: replace it by the file itself")
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ReGradFileError(f"cannot {action} {path}: the disk is full; free space and try again ({error})")
    return ReGradFileError(f"cannot {action} {path}: {error.strerror or error}")


def checked_json(data: bytes | str, where: Path | str) -> Any:
    """Parses JSON text (UTF-8 bytes or a string) with the bank's caps on nesting, integers and Unicode.

    Raises:
        [`ReGradValueError`]: naming `where`, for invalid UTF-8 or JSON, or anything over the caps.
    """
    value = parse_json(data, where, max_depth=MAX_JSON_DEPTH, max_int_digits=MAX_INT_DIGITS)
    check_json_value(value, where)
    return value


def check_json_value(value: Any, where: Path | str) -> None:
    """Refuses what a bank could not write as UTF-8 JSON and read back: other types than JSON's, non-string keys,
    NaN and infinities (not JSON: other readers refuse them), lone surrogates, nesting deeper than
    [`MAX_JSON_DEPTH`], integers longer than [`MAX_INT_DIGITS`] digits."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ReGradValueError(f"{where} nests JSON deeper than the limit of {MAX_JSON_DEPTH}")
            if isinstance(item, dict):
                for key in item:
                    if not isinstance(key, str):
                        raise ReGradValueError(f"{where} has a key {_short(key)} that is not a string")
                    _check_unicode(key, where)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            _check_unicode(item, where)
        elif _is_int(item):
            if abs(item) >= _INT_LIMIT:
                raise ReGradValueError(f"{where} holds an integer of more than {MAX_INT_DIGITS} digits")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ReGradValueError(f"{where} holds {item!r}, which JSON cannot represent (only finite numbers)")
        elif not isinstance(item, (bool, type(None))):
            raise ReGradValueError(f"{where} holds a {type(item).__name__}, which is not JSON")


def _check_unicode(text: str, where: Path | str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ReGradValueError(f"{where} holds a string that is not valid Unicode (lone surrogates)") from None


def read_json_file(path: Path, follow: bool = False) -> Any:
    """Reads a JSON file of at most [`MAX_CONFIG_BYTES`], not through a symlink unless `follow`."""
    return checked_json(read_bytes(path, MAX_CONFIG_BYTES, follow), f"bank file {path}")


def validate_config(config: Any, path: Path) -> dict[str, Any]:
    """Checks a parsed `bank_config.json` (any readable format version) and returns it.

    Raises:
        [`ReGradValueError`]: naming the file and the first bad field.
    """
    if not isinstance(config, dict):
        raise ReGradValueError(f"{path}: must hold a JSON object, got {type(config).__name__}")
    version = config.get("format_version")
    if not _is_int(version) or version not in READABLE_FORMAT_VERSIONS:
        raise _fail(
            path,
            "format_version",
            f"is {_short(version)}; this regrad-hf reads versions {list(READABLE_FORMAT_VERSIONS)} "
            "(upgrade regrad-hf to read newer banks)",
        )
    _str(config, "fingerprint", path, SHA256)
    learner = config.get("learner")
    if not isinstance(learner, dict) or not learner or len(learner) > 64:
        raise _fail(path, "learner", "must be a non-empty object of at most 64 fields")
    for key, value in learner.items():
        if not isinstance(value, (str, int, float, bool, type(None))) or len(str(value)) > MAX_STRING_CHARS:
            raise _fail(path, f"learner.{key}", f"must be a JSON scalar of at most {MAX_STRING_CHARS} characters")
    _str(config, "embedder", path)
    _int(config, "embedding_dim", path, 1, MAX_EMBEDDING_DIM)
    if version >= 3:  # checksums of the catalogue and the index, and the embedder's identity (null: not known)
        _str(config, "documents_sha256", path, SHA256)
        _str(config, "index_sha256", path, SHA256)
        if config.get("embedder_sha256") is not None:
            _str(config, "embedder_sha256", path, SHA256)
    for key, expected in (("index_metric", "cos"), ("index_dtype", "f32")):
        if config.get(key) != expected:
            raise _fail(path, key, f"must be {expected!r}, got {_short(config.get(key))}")
    _index_settings(config, path)
    dtypes = list(FLOAT_DTYPES) if version == 1 else list(BANK_DTYPES)
    if config.get("dtype") not in dtypes:
        raise _fail(
            path, "dtype", f"must be one of {dtypes} in format version {version}, got {_short(config.get('dtype'))}"
        )
    quantization = config.get("quantization")
    if config["dtype"] in FLOAT_DTYPES:
        if quantization is not None:
            raise _fail(path, "quantization", f"must be null for dtype {config['dtype']!r}")
    else:
        if not isinstance(quantization, dict) or quantization.get("method") != "absmax":
            raise _fail(path, "quantization", "must be an object with method 'absmax', bits and group_size")
        if quantization.get("scale_dtype") != "bfloat16":
            raise _fail(
                path, "quantization.scale_dtype", f"must be 'bfloat16', got {_short(quantization.get('scale_dtype'))}"
            )
        try:
            gradient_format(config["dtype"], quantization)
        except ReGradValueError as error:
            raise _fail(path, "quantization", f"is invalid: {error}") from None
    num_documents = _int(config, "num_documents", path, 0, MAX_DOCUMENTS)

    shapes = config.get("parameter_shapes")
    if not isinstance(shapes, dict) or not shapes or len(shapes) > MAX_TENSORS:
        raise _fail(path, "parameter_shapes", f"must be a non-empty object of at most {MAX_TENSORS} tensors")
    for name, shape in shapes.items():
        field = f"parameter_shapes.{name}"
        if not name or len(name) > MAX_STRING_CHARS:
            raise _fail(path, field, "has an empty or overlong tensor name")
        if (
            not isinstance(shape, list)
            or not 1 <= len(shape) <= MAX_TENSOR_RANK
            or not all(_is_int(size) and size >= 1 for size in shape)
            or math.prod(shape) > MAX_TENSOR_ELEMENTS
        ):
            raise _fail(
                path,
                field,
                f"must be a list of 1 to {MAX_TENSOR_RANK} positive sizes with at most {MAX_TENSOR_ELEMENTS} elements "
                f"in all, got {_short(shape)}",
            )

    shards = config.get("shards")
    if not isinstance(shards, list):
        raise _fail(path, "shards", "must be a list")
    files = set()
    for index, shard in enumerate(shards):
        field = f"shards[{index}]"
        if not isinstance(shard, dict):
            raise _fail(path, field, "must be an object with file, sha256 and num_documents")
        # the pattern also keeps shard paths inside the bank directory
        files.add(_str(shard, "file", path, SHARD_FILE, field=f"{field}.file"))
        _str(shard, "sha256", path, SHA256, field=f"{field}.sha256")
        _int(shard, "num_documents", path, 0, MAX_DOCUMENTS, field=f"{field}.num_documents")
    if len(files) != len(shards):
        raise _fail(path, "shards", "names the same file twice")
    stored = sum(shard["num_documents"] for shard in shards)
    if stored != num_documents:
        raise _fail(path, "num_documents", f"is {num_documents}, but the shards hold {stored} documents")
    return config


INDEX_SETTINGS_RANGES = {
    "connectivity": (2, MAX_CONNECTIVITY),
    "expansion_add": (1, MAX_EXPANSION),
    "expansion_search": (1, MAX_EXPANSION),
}


def _index_settings(config: Mapping, path: Path) -> None:
    """Checks the optional `"index_settings"` (absent in banks saved before they were configurable)."""
    if "index_settings" not in config:
        return
    settings = config["index_settings"]
    if not isinstance(settings, dict) or set(settings) != set(INDEX_SETTINGS_RANGES):
        raise _fail(path, "index_settings", f"must be an object with exactly the fields {list(INDEX_SETTINGS_RANGES)}")
    for key, (low, high) in INDEX_SETTINGS_RANGES.items():
        _int(settings, key, path, low, high, field=f"index_settings.{key}")


def validate_document(record: Any, path: Path, number: int, shard_sizes: list[int]) -> dict[str, Any]:
    """Checks one parsed line of `documents.jsonl` against the shards it points into and returns it."""
    where = Path(f"{path} line {number}")
    if not isinstance(record, dict):
        raise ReGradValueError(f"{where}: must hold a JSON object")
    unknown = sorted(set(record) - set(DOCUMENT_FIELDS))
    if unknown:
        raise _fail(where, unknown[0], f"is unknown (the fields are {list(DOCUMENT_FIELDS)})")
    doc_id = record.get("id")
    if not isinstance(doc_id, str) or not doc_id or len(doc_id) > MAX_ID_CHARS:
        raise _fail(where, "id", f"must be a non-empty string of at most {MAX_ID_CHARS} characters")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_CHARS:
        raise _fail(where, "text", f"must be a non-empty string of at most {MAX_TEXT_CHARS} characters")
    for field in ("id", "text"):
        try:
            record[field].encode("utf-8")
        except UnicodeEncodeError:
            raise _fail(where, field, "is not valid Unicode (lone surrogate escapes)") from None
    metadata = record.get("metadata")
    if not isinstance(metadata, dict):
        raise _fail(where, "metadata", "must be a JSON object")
    check_metadata_size(metadata, where)
    _int(record, "key", where, 0, (1 << 63) - 1)
    shard = _int(record, "shard", where, 0, max(0, len(shard_sizes) - 1))
    if not shard_sizes:
        raise _fail(where, "shard", "points into a bank without shards")
    _int(record, "row", where, 0, shard_sizes[shard] - 1)
    return record


def check_metadata_size(metadata: Mapping[str, Any], where: Path | str) -> None:
    """Refuses metadata whose JSON is larger than [`MAX_METADATA_BYTES`]."""
    size = len(json.dumps(metadata, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    if size > MAX_METADATA_BYTES:
        raise ReGradValueError(f"{where}: metadata of {size} bytes is larger than the limit of {MAX_METADATA_BYTES}")


def encode_record(record: Mapping[str, Any]) -> bytes:
    """One line of `documents.jsonl` (without its newline): the bytes a save writes and a load reads."""
    return json.dumps(dict(record), ensure_ascii=False).encode("utf-8")


def check_record_line(line: bytes, where: Path | str) -> None:
    """Refuses a `documents.jsonl` line longer than [`MAX_DOCUMENT_RECORD_BYTES`]."""
    if len(line) > MAX_DOCUMENT_RECORD_BYTES:
        raise ReGradValueError(
            f"{where} is {len(line)} bytes long as stored (JSON writes a control character as 6 bytes), more than "
            f"the limit of {MAX_DOCUMENT_RECORD_BYTES} bytes a bank loads"
        )


def check_storable(doc_id: str, text: str, metadata: Mapping[str, Any], where: str) -> None:
    """Checks a document entering a bank with the checks of a load, on the bytes a save would write: its record,
    encoded with the largest key, shard and row a bank can give it, is parsed back and validated as a load does.
    Whatever passes is saved and loads again.

    Raises:
        [`ReGradValueError`]: naming `where`, for anything a load would refuse (a line over the cap, a text over
            [`MAX_TEXT_CHARS`] characters, metadata over [`MAX_METADATA_BYTES`], JSON over the caps).
    """
    record = {"id": doc_id, "text": text, "metadata": metadata, "key": (1 << 63) - 1}
    line = encode_record({**record, "shard": MAX_DOCUMENTS, "row": MAX_DOCUMENTS})
    check_record_line(line, where)
    parsed = checked_json(line, where)
    validate_document({**parsed, "shard": 0, "row": 0}, Path(where), 1, [1])

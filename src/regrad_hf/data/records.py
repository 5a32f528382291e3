"""Checked reading of user data: JSON text, JSON Lines, and the fields of one record.

Every loader reads through these helpers, so a malformed file or row raises one [`ReGradValueError`] that names the
file, the line or record and the field (`data[3].paragraphs[0].qas[2].answers`), instead of a `KeyError`,
`TypeError` or `RecursionError` from deep inside a loader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..errors import ReGradTypeError, ReGradValueError


class _Constant(ValueError):
    """`NaN`, `Infinity` or `-Infinity` in a file: Python's `json` accepts them, JSON does not."""


def _reject_constant(name: str):
    raise _Constant(name)


def parse_json(
    data: bytes | str, where: str | os.PathLike, *, max_depth: int | None = None, max_int_digits: int | None = None
) -> Any:
    """`json.loads` of JSON text (UTF-8 bytes or a string), refusing `NaN`/`Infinity`, nesting too deep to parse and,
    when `max_int_digits` is given, longer integers. The one JSON parser of the package: user data reads through it,
    and a bank's files with its caps (`regrad_hf.bank.schema.checked_json`).

    Args:
        max_depth (`int`, *optional*): the nesting the caller allows (checked by the caller), named when the text
            nests too deeply to parse at all.
        max_int_digits (`int`, *optional*): the most digits an integer may have.

    Raises:
        [`ReGradValueError`]: `data` is not UTF-8 or not JSON, or is over a cap; the message starts with `where`
            (a file, a line).
    """

    def parse_int(digits: str) -> int:
        if len(digits.lstrip("-")) > max_int_digits:
            raise ReGradValueError(f"holds an integer of {len(digits)} digits, more than the limit of {max_int_digits}")
        return int(digits)

    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, parse_constant=_reject_constant, parse_int=parse_int if max_int_digits else None)
    except UnicodeDecodeError as error:
        raise ReGradValueError(f"{where} is not valid UTF-8: {error}") from None
    except json.JSONDecodeError as error:
        raise ReGradValueError(f"{where} is not valid JSON: {error}") from None
    except _Constant as error:
        raise ReGradValueError(
            f"{where} is not valid JSON: {error} is not a JSON value (JSON cannot represent NaN or infinities)"
        ) from None
    except RecursionError:
        if max_depth is not None:
            raise ReGradValueError(f"{where} nests JSON deeper than the limit of {max_depth}") from None
        raise ReGradValueError(f"{where} is not valid JSON: it is nested too deeply") from None
    except ReGradValueError as error:
        raise ReGradValueError(f"{where} {error}") from None


def text_lines(text: str) -> Iterator[tuple[int, str]]:
    """`(line number, line)` of every non-blank line.

    Lines end at `\\n` only: `str.splitlines` also splits at U+2028, U+0085 and form feeds, which JSON strings may
    hold unescaped (`json.dumps(..., ensure_ascii=False)` writes them), so it would cut valid JSON Lines apart.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line


def json_lines(text: str, path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """`(line number, value)` of every non-blank line of JSON Lines `text` read from `path`."""
    for number, line in text_lines(text):
        yield number, parse_json(line, f"{path} line {number}")


def json_records(text: str, path: str | os.PathLike) -> list[dict]:
    """The records (JSON objects) of a JSON list or JSON Lines file; an element that is not an object is named."""
    if text.lstrip().startswith("["):
        values = parse_json(text, str(path))
        located = [(f"{path} record {index}", value) for index, value in enumerate(values)]
    else:
        located = [(f"{path} line {number}", value) for number, value in json_lines(text, path)]
    return [mapping(value, where) for where, value in located]


def describe(source: Any) -> str:
    """How an error names a loader's source: its path or name, or its kind (a `Dataset`'s repr spans lines)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return "the rows" if isinstance(source, (list, tuple)) else f"the {type(source).__name__}"


def mapping(value: Any, where: str) -> Mapping:
    """`value`, which must be a JSON object (a mapping)."""
    if not isinstance(value, Mapping):
        raise ReGradValueError(f"{where} is a {_kind(value)}, not an object")
    return value


def field(record: Mapping, key: str, where: str) -> Any:
    """`record[key]`, which must be there."""
    if key not in record:
        raise ReGradValueError(f"{where} has no {key!r} field (it has {sorted(map(str, record))})")
    return record[key]


def text_at(record: Mapping, key: str, where: str) -> str:
    """`record[key]`, which must be there and be a string."""
    return string(field(record, key, where), f"{where}.{key}")


def list_at(record: Mapping, key: str, where: str) -> list:
    """`record[key]`, which must be there and be a list."""
    return sequence(field(record, key, where), f"{where}.{key}")


def string(value: Any, where: str) -> str:
    """`value`, which must be a string (emptiness is the caller's rule)."""
    if not isinstance(value, str):
        raise ReGradValueError(f"{where} must be a string, not a {_kind(value)}")
    return value


def sequence(value: Any, where: str) -> list:
    """`value`, which must be a list (a JSON array; a tuple or a dataset's list column too)."""
    if not isinstance(value, (list, tuple)):
        raise ReGradValueError(f"{where} must be a list, not a {_kind(value)}")
    return list(value)


def strings(value: Any, where: str) -> list[str]:
    """`value`, which must be a list of strings (a single string is refused, not split into characters)."""
    return [string(item, f"{where}[{index}]") for index, item in enumerate(sequence(value, where))]


def identifier(value: Any, where: str) -> str | None:
    """An id as a string: `None` stays `None`, an integer becomes its digits; anything else is refused."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ReGradValueError(f"{where} must be a string or an integer, not a {_kind(value)}")


def indices(values: Iterable[int], what: str, size: int | None = None) -> list[int]:
    """`values` as a list of indices: integers (not `bool`), at least 0 and, with `size`, below it.

    A negative index would silently count from the end (article -1 is the last one), so it is refused.
    """
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise ReGradTypeError(f"{what} indices must be an iterable of integers, got {type(values).__name__}")
    checked = []
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ReGradTypeError(f"{what} indices must be integers, got {value!r}")
        if value < 0 or (size is not None and value >= size):
            bounds = f"in [0, {size})" if size is not None else "at least 0"
            raise ReGradValueError(f"{what} indices must be {bounds}, got {value}")
        checked.append(value)
    return checked


def _kind(value: Any) -> str:
    names = {type(None): "null", bool: "boolean", dict: "object", list: "list", str: "string"}
    return names.get(type(value), type(value).__name__)

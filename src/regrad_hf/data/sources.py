"""Where data comes from: a local file or folder, a Hub dataset name, or a `datasets.Dataset` already loaded.

[`read_rows`] turns any of these into rows (mappings of column to value): a `Dataset` as it is, one split of a
`DatasetDict`, a Hub dataset through `datasets.load_dataset`, a local dataset folder through `load_dataset` (or
`load_from_disk` when it was written by `save_to_disk`), a local file through the caller's reader. A string is a Hub
name only when it cannot be a local path (see [`looks_like_hub_id`]), so a mistyped path is reported as missing
instead of being looked up on the Hub. `datasets` is imported only when it is needed.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import stat
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ReGradError, ReGradFileError, ReGradHubError, ReGradValueError
from ..names import looks_like_hub_id, missing_path_message

# Files always read by `datasets` (the loaders' own readers are for JSON and JSON Lines).
DATASET_SUFFIXES = (".parquet", ".csv", ".arrow")
Rows = Sequence[Mapping[str, Any]]


def is_dataset(obj: Any) -> bool:
    """Whether `obj` is a `datasets.Dataset` (checked without importing `datasets`)."""
    module = sys.modules.get("datasets")
    return module is not None and isinstance(obj, module.Dataset)


def is_dataset_dict(obj: Any) -> bool:
    """Whether `obj` is a `datasets.DatasetDict` (checked without importing `datasets`)."""
    module = sys.modules.get("datasets")
    return module is not None and isinstance(obj, module.DatasetDict)


def is_iterable_dataset(obj: Any) -> bool:
    """Whether `obj` is a `datasets.IterableDataset` or `IterableDatasetDict` (a streamed dataset)."""
    module = sys.modules.get("datasets")
    return module is not None and isinstance(obj, (module.IterableDataset, module.IterableDatasetDict))


STREAM_BATCH_ROWS = 1_000


def stream_rows(dataset: Any, batch_size: int = STREAM_BATCH_ROWS) -> list[dict[str, Any]]:
    """The rows of a `datasets.IterableDataset`, read `batch_size` at a time (it has no length or random access)."""
    rows = []
    for batch in dataset.iter(batch_size=batch_size):
        names = list(batch)
        rows.extend(dict(zip(names, values, strict=True)) for values in zip(*batch.values(), strict=True))
    return rows


def pick_split(dataset_dict, split: str | None, default: str | None = None):
    """One split of a `DatasetDict`: `split`; else the only one it has, else `default`."""
    if split is None:
        if len(dataset_dict) == 1:
            split = next(iter(dataset_dict))
        elif default in dataset_dict:
            split = default
        else:
            raise ReGradValueError(f"the DatasetDict has the splits {sorted(dataset_dict)}: say which one with split=")
    if split not in dataset_dict:
        raise ReGradValueError(f"the DatasetDict has no split {split!r}; it has {sorted(dataset_dict)}")
    return dataset_dict[split]


def read_rows(
    source: Any,
    *,
    config: str | None = None,
    split: str | None = None,
    default_split: str | None = None,
    read_file: Callable[[Path], Rows] | None = None,
) -> Rows:
    """The rows of `source`.

    Args:
        source: a `datasets.Dataset`, a `datasets.DatasetDict`, a streamed `datasets.IterableDataset` (read in
            batches of rows into a list), a sequence of mappings, a local file or dataset folder, or a Hub dataset
            name (e.g. `"rajpurkar/squad"`).
        config (`str`, *optional*): the configuration (subset) of a Hub dataset or dataset folder.
        split (`str`, *optional*): the split of a `DatasetDict`, Hub dataset or dataset folder.
        default_split (`str`, *optional*): the split taken when `split` is not given and there are several.
        read_file (*optional*): reads a local JSON or JSONL file into rows; other files, and all files without it,
            are read by `datasets` by their suffix.

    Returns:
        A `datasets.Dataset` or a sequence of mappings (a list of dicts for an `IterableDataset`).
    """
    if is_dataset_dict(source):
        return pick_split(source, split, default_split)
    if is_dataset(source):
        return source
    if is_iterable_dataset(source):
        module = sys.modules["datasets"]
        picked = pick_split(source, split, default_split) if isinstance(source, module.IterableDatasetDict) else source
        return stream_rows(picked)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes, bytearray)):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ReGradValueError(
            f"cannot read data from a {type(source).__name__}: give a path, a Hub dataset name or a datasets.Dataset"
        )
    path = Path(source).expanduser()
    if is_special(path):  # never a Hub name, and reading it could block
        raise ReGradValueError(not_a_file_message(source))
    if path.is_file():
        custom = read_file is not None and path.suffix.lower() not in DATASET_SUFFIXES
        return read_file(path) if custom else _load_file(path)
    name = os.fspath(source)
    if not path.is_dir() and not (isinstance(source, str) and looks_like_hub_id(name)):
        raise ReGradValueError(missing_path_message(name))
    import datasets

    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # written by save_to_disk
            check_saved_dataset(path)
            loaded = datasets.load_from_disk(str(path))
        else:  # a dataset folder or a Hub dataset
            loaded = datasets.load_dataset(name, config, split=split)
    except ReGradError:
        raise
    except Exception as error:  # datasets raises many types: ConnectionError, DatasetNotFoundError, ValueError...
        raise _load_error(name, path.is_dir(), error) from error
    return pick_split(loaded, split, default_split) if isinstance(loaded, datasets.DatasetDict) else loaded


_SAVED_JSON_BYTES = 16 << 20  # a save_to_disk folder's dataset_dict.json or state.json, at most


def check_saved_dataset(folder: Path) -> None:
    """Confines a `save_to_disk` folder to itself before `datasets.load_from_disk` reads it: `load_from_disk` joins
    the split names of `dataset_dict.json` and the data file names of each `state.json` to the folder as they are, so
    a split `"../../other"` or `"/abs"` (or a symlink) would read data from elsewhere.

    Raises:
        [`ReGradValueError`]: a split or data file name that is not a plain name inside its folder.
        [`ReGradFileError`]: a file or folder it reads is a symlink, or a JSON file cannot be read.
    """
    splits = [folder]
    if (folder / "dataset_dict.json").is_file():
        listed = _saved_json(folder / "dataset_dict.json").get("splits")
        if not isinstance(listed, list):
            raise ReGradValueError(f"{folder / 'dataset_dict.json'} has no list of splits")
        splits = [_inside(folder, name, "split") for name in listed]
    for split in splits:
        _refuse_symlink(split)
        files = _saved_json(split / "state.json").get("_data_files")
        if not isinstance(files, list) or not all(isinstance(entry, dict) for entry in files):
            raise ReGradValueError(f"{split / 'state.json'} has no list of data files")
        for entry in files:
            _refuse_symlink(_inside(split, entry.get("filename"), "data file"))
        _refuse_symlink(split / "dataset_info.json")


def _inside(folder: Path, name: object, what: str) -> Path:
    """`folder / name` for a plain file or folder name; raises for anything that could leave `folder`."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0") or ":" in name:
        raise ReGradValueError(
            f"{folder} names the {what} {name!r:.80}, which is not a plain name inside it (a saved dataset never "
            "reads from outside its folder)"
        )
    return folder / name


def _refuse_symlink(path: Path) -> None:
    if path.is_symlink():
        raise ReGradFileError(f"{path} is a symlink; a saved dataset is never read through one: copy the data in")


def _saved_json(path: Path) -> dict:
    _refuse_symlink(path)
    try:
        if path.stat().st_size > _SAVED_JSON_BYTES:
            raise ReGradValueError(f"{path} is larger than {_SAVED_JSON_BYTES >> 20} MiB; it is not a saved dataset's")
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ReGradFileError(f"cannot read {path}: {error.strerror or error}") from error
    except ValueError as error:
        if isinstance(error, ReGradError):
            raise
        raise ReGradValueError(f"{path} is not valid JSON: {_first_line(error)}") from error
    if not isinstance(value, dict):
        raise ReGradValueError(f"{path} is not a JSON object")
    return value


def _load_file(path: Path):
    import datasets

    builders = {".jsonl": "json", ".json": "json", ".txt": "text", **{s: s[1:] for s in DATASET_SUFFIXES}}
    if path.suffix.lower() not in builders:
        raise ReGradValueError(f"cannot read {path}: use a .jsonl, .json, .parquet, .csv, .arrow or .txt file")
    try:
        return datasets.load_dataset(builders[path.suffix.lower()], data_files=str(path), split="train")
    except Exception as error:
        raise ReGradValueError(f"cannot read {path}: {_first_line(error)}") from error


def _load_error(name: str, local: bool, error: Exception) -> Exception:
    if local:
        return ReGradValueError(f"cannot load the dataset folder {name}: {_first_line(error)}")
    from huggingface_hub import constants  # offline mode as the Hub client and datasets have it

    offline = constants.is_offline_mode()
    # The name is not a local path either: say so, in case it is a mistyped one.
    return ReGradHubError(
        f"no local file or directory {name}, and the Hub dataset {name!r} cannot be loaded"
        f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {_first_line(error)}"
    )


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


MAX_DECOMPRESSED_BYTES = 1 << 30  # a gzip file's text, at most (SQuAD v1.1 train is 30 MB)


def read_text_file(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file the user named (documents, questions, tasks); a leading byte-order mark is dropped
    and a gzip-compressed file (recognised by its magic bytes, e.g. `train-v1.1.json.gz`) is decompressed.

    The file is opened without blocking and must be a regular file: a FIFO would block the read forever, a device
    such as `/dev/zero` would never end.

    Raises:
        [`ReGradValueError`]: the file is not UTF-8 text (a binary file, another encoding), or not a regular file.
        [`ReGradFileError`]: it is missing or unreadable (its message names the file).
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise ReGradFileError(f"cannot read {os.fspath(path)}: {error.strerror or error}") from error
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ReGradValueError(not_a_file_message(path))
        data = handle.read()
    if data[:2] == b"\x1f\x8b":
        try:  # read at most one byte past the cap, so a decompression bomb cannot fill the memory
            data = gzip.GzipFile(fileobj=io.BytesIO(data)).read(MAX_DECOMPRESSED_BYTES + 1)
        except (OSError, EOFError, zlib.error) as error:
            raise ReGradValueError(f"{path} is a damaged gzip file: {_first_line(error)}") from None
        if len(data) > MAX_DECOMPRESSED_BYTES:
            raise ReGradValueError(f"{path} decompresses to more than {MAX_DECOMPRESSED_BYTES >> 20} MiB")
    data = data.removeprefix(codecs.BOM_UTF8)  # Windows editors write one; json.loads refuses it
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ReGradValueError(
            f"{path} is not UTF-8 text (byte {error.start} is {data[error.start : error.start + 1]!r}): "
            "save it as UTF-8"
        ) from None


def not_a_file_message(path: str | os.PathLike) -> str:
    """The message for a path that exists but is neither a regular file nor a directory (a FIFO, a device)."""
    return f"{os.fspath(path)} is not a regular file (a FIFO, device or socket cannot be read as data)"


def is_special(path: Path) -> bool:
    """Whether `path` exists but is neither a regular file nor a directory (after symlinks): a FIFO, a device."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))

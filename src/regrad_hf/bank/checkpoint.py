"""Resumable (and multi-process) bank builds: the state a build keeps next to its output.

`GradientBank.build(..., output_dir=out)` works in a hidden sibling directory `.out.build/`:

    build_state.json                    what is being built (learner fingerprint, format, documents digest, shard size)
    gradients/shard-NNNNN.safetensors   finished shards, exactly as the final bank holds them
    embeddings/shard-NNNNN.safetensors  the embeddings of each finished shard's documents
    records/shard-NNNNN.json            one per finished shard: its two files and their SHA-256

The documents are cut into shards of a fixed number of documents (from `max_shard_bytes`), whatever the number of
processes. A shard is finished when its record is: both files are written atomically before the record, so a kill
at any point leaves only complete shards recorded, and shards can finish in any order (each process of a
distributed build computes its own). A build resumes by verifying the records' checksums and computing the shards
that have none, with any number of processes. When every shard is done the catalogue (documents, index,
`bank_config.json`) is written into the work directory, which is then swapped in for `out` whole.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import BankMismatchError, ReGradValueError
from ..files import atomic_write_text
from .schema import SHA256, SHARD_FILE, read_json_file

BUILD_STATE_FILE = "build_state.json"
EMBEDDINGS_DIR = "embeddings"
RECORDS_DIR = "records"
BUILD_FILES = (BUILD_STATE_FILE, EMBEDDINGS_DIR, RECORDS_DIR)
BUILD_STATE_VERSION = 2
_EMBEDDINGS_FILE = re.compile(rf"{EMBEDDINGS_DIR}/shard-[0-9]{{5,9}}\.safetensors")
# what must be equal for a build to resume, besides the learner fingerprint
_SAME_BUILD = ("dtype", "quantization", "embedder", "documents_digest", "num_documents", "documents_per_shard")


def work_directory(output: Path) -> Path:
    """The hidden sibling directory where a build into `output` keeps its state."""
    return output.parent / f".{output.name}.build"


def documents_digest(ids: Sequence[str], texts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 of the documents in order (ids, texts, metadata): a resumed build must get the same ones."""
    digest = hashlib.sha256()
    for doc_id, text, meta in zip(ids, texts, metadata, strict=True):
        record = json.dumps([doc_id, text, dict(meta)], ensure_ascii=False, sort_keys=True)
        digest.update(record.encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def new_state(fingerprint: str, **fields: Any) -> dict[str, Any]:
    return {"build_state_version": BUILD_STATE_VERSION, "fingerprint": fingerprint, **fields}


def shard_count(state: Mapping[str, Any]) -> int:
    """How many shards the build described by `state` has."""
    return -(-state["num_documents"] // state["documents_per_shard"])


def shard_size(state: Mapping[str, Any], shard: int) -> int:
    """How many documents shard number `shard` holds (the last one may hold fewer)."""
    per_shard = state["documents_per_shard"]
    return min(per_shard, state["num_documents"] - shard * per_shard)


def record_path(directory: Path, shard: int) -> Path:
    return directory / RECORDS_DIR / f"shard-{shard:05d}.json"


def write_record(directory: Path, shard: int, record: Mapping[str, str]) -> None:
    """Marks shard number `shard` finished; its files must already be written."""
    atomic_write_text(record_path(directory, shard), json.dumps(dict(record), indent=2) + "\n")


def find_state(output: Path) -> tuple[Path, dict[str, Any]] | None:
    """The directory and state of an unfinished build into `output`, if there is one: the work directory, or `output`
    itself when a build was killed after swapping in the finished bank but before removing its state."""
    for directory in (work_directory(output), output):
        path = directory / BUILD_STATE_FILE
        if path.is_file():
            state = read_json_file(path)
            if not isinstance(state, dict) or state.get("build_state_version") != BUILD_STATE_VERSION:
                raise ReGradValueError(
                    f"{path} is not a build state this regrad-hf can resume; delete {directory} to start over"
                )
            return directory, state
    return None


def check_same_build(state: Mapping[str, Any], expected: Mapping[str, Any], where: Path) -> None:
    """Refuses to resume a build of other documents, another format or another learner."""
    if state.get("fingerprint") != expected["fingerprint"]:
        raise BankMismatchError(
            f"{where} holds an interrupted build by learner {str(state.get('fingerprint'))[:12]}, this model is "
            f"learner {expected['fingerprint'][:12]}: its finished shards do not apply to this model. Build with "
            f"the same learner to resume, or delete {where} to start over."
        )
    different = [field for field in _SAME_BUILD if state.get(field) != expected[field]]
    if different:
        raise ReGradValueError(
            f"{where} holds an interrupted build with other {', '.join(different)} than this one "
            f"({', '.join(f'{f}: {_short(state.get(f))} there, {_short(expected[f])} now' for f in different)}). "
            f"Pass the same documents and settings to resume, or delete {where} to start over."
        )


def finished_shards(directory: Path, state: Mapping[str, Any], verify: bool = True) -> dict[int, dict[str, str]]:
    """The records of the shards that are finished in `directory`, by shard number: records well-formed, files
    present and, with `verify`, their checksums matching. A build computes the others."""
    finished = {}
    for shard in range(shard_count(state)):
        path = record_path(directory, shard)
        if not path.is_file():
            continue
        try:
            record = read_json_file(path)
            files = ((record["file"], record["sha256"]), (record["embeddings"], record["embeddings_sha256"]))
        except (KeyError, TypeError, ValueError):
            continue
        if all(
            isinstance(name, str)
            and (SHARD_FILE.fullmatch(name) or _EMBEDDINGS_FILE.fullmatch(name))
            and isinstance(sha, str)
            and SHA256.fullmatch(sha)
            and (directory / name).is_file()
            and (not verify or file_sha256(directory / name) == sha)
            for name, sha in files
        ):
            finished[shard] = record
    return finished


def resume_message(output: Path) -> str | None:
    """A line saying how far an interrupted build into `output` got, or `None` when there is none to resume."""
    found = find_state(Path(output).resolve())
    if found is None:
        return None
    directory, state = found
    total, per_shard = state.get("num_documents"), state.get("documents_per_shard")
    if not isinstance(total, int) or not isinstance(per_shard, int) or per_shard < 1:
        return None
    done = sum(shard_size(state, shard) for shard in finished_shards(directory, state))
    return f"resuming the interrupted build in {directory}: {done} of {total} documents already done"


def remove_stray_files(directory: Path) -> None:
    """Deletes temporary files a killed atomic write left behind (they would otherwise be published)."""
    for path in directory.rglob(".*.tmp"):
        path.unlink(missing_ok=True)
    for path in directory.glob(".*.copying"):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def remove_build_files(directory: Path) -> None:
    (directory / BUILD_STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(directory / EMBEDDINGS_DIR, ignore_errors=True)
    shutil.rmtree(directory / RECORDS_DIR, ignore_errors=True)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 16 else text[:12] + "..."

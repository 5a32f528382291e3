"""Writing a bank's files and reading them back, every file checked before it is trusted."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from ..errors import BankNotFoundError, ReGradError, ReGradFileError, ReGradValueError
from ..files import DIRECTORY_MODE, atomic_write_bytes, atomic_write_text, directory_argument
from ..hub.cards import render_bank_card
from ..hub.repos import HubOptions, Location, check_subfolder, locate, push_folder
from .directory import (
    CONFIG_FILE,
    DOCUMENTS_FILE,
    EAGER_FILES,
    GRADIENTS_DIR,
    INDEX_FILE,
    interrupted_backup,
    publish,
    regular_file,
    was_a_bank,
    writer_active,
    writer_lock,
)
from .index import INDEX_DTYPE, INDEX_METRIC, LEGACY_INDEX_SETTINGS, IndexSettings
from .parts import Bank, BankParts
from .schema import MAX_CONFIG_BYTES, checked_json, file_error, read_bytes, validate_config

# 2: quantised formats (int8/int4/int3/int2: `<name>.codes` and `<name>.scales` per LoRA tensor) and their parameters
# in bank_config.json ("quantization"). Version 1 banks (float formats only) read unchanged.
# 3: SHA-256 of documents.jsonl and index.usearch ("documents_sha256", "index_sha256") and the embedder's identity
# ("embedder_sha256"), verified on load. Versions 1 and 2 still read, without those checks (their shards are
# checksummed); saving one writes version 3. Optional in version 3: the HNSW settings ("index_settings"); a config
# without them loads with the settings banks were built with before (usearch's defaults).
FORMAT_VERSION = 3
MAX_DOCUMENTS_BYTES = 1 << 40
MAX_INDEX_BYTES = 1 << 40
READ_ATTEMPTS = 50  # a reader loads again when a writer swapped the directory while it read; this many times at most

Placements = dict[str, tuple[int, int]]  # document id -> (shard, row)


def save(bank: BankParts, save_directory: Path, max_shard_bytes: int) -> None:
    """[`GradientBank.save_pretrained`]: with the directory's writer lock held, writes a staging directory and swaps
    it in whole; a failure (a full disk included) raises a [`ReGradError`] and leaves the directory as it was."""
    target = save_directory.resolve()
    bank.store.documents_per_shard(max_shard_bytes)  # checked before the lock file is created
    try:
        with writer_lock(target):
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
            try:
                staging.chmod(DIRECTORY_MODE)
                placements, shards = write_files(bank, staging, max_shard_bytes)
                publish(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            # The saved files now hold every gradient: read from them instead of memory. Opened under the lock,
            # so that they are this save's files, not those of a writer that comes next.
            rows = [sum(1 for s, _ in placements.values() if s == index) for index in range(len(shards))]
            bank.store.attach(Location(target), shards, rows, eager=True)
    except OSError as error:
        if isinstance(error, ReGradError) and error.errno is None:  # ours, already saying what to do
            raise
        # the operating system's, or an atomic write's (files.py keeps its errno): name the bank, not a staging file
        raise file_error(error, Path(error.filename or target), "write the bank into") from error
    except SafetensorError as error:  # safetensors reports its I/O failures (ENOSPC included) this way
        raise ReGradFileError(f"cannot write the bank into {target}: {error}") from error
    bank.store.mark_verified()  # checksummed just now, as written
    for doc_id, (shard, row) in placements.items():
        bank.catalogue[doc_id].shard, bank.catalogue[doc_id].row = shard, row
    bank.store.in_memory.clear()


def write_files(bank: BankParts, directory: Path, max_shard_bytes: int) -> tuple[Placements, list[dict[str, str]]]:
    """Writes every bank file into `directory`. Returns where each document's gradient went, and the shards
    (file and SHA-256)."""
    per_shard = bank.store.documents_per_shard(max_shard_bytes)
    ids = bank.ids
    (directory / GRADIENTS_DIR).mkdir()
    placements: Placements = {}
    shards: list[dict[str, str]] = []
    for shard, start in enumerate(range(0, len(ids), per_shard)):
        chunk = ids[start : start + per_shard]
        tensors = bank.stored_rows(chunk)
        shards.append(bank.store.write_shard(directory, shard, tensors))
        placements.update({doc_id: (shard, row) for row, doc_id in enumerate(chunk)})
    write_catalogue(bank, directory, placements, shards)
    return placements, shards


def write_catalogue(
    bank: BankParts, directory: Path, placements: Mapping[str, tuple[int, int]], shards: list[dict[str, str]]
) -> None:
    """Writes documents.jsonl, index.usearch and bank_config.json (last: a directory with it is complete)."""
    documents = bank.catalogue.lines(placements)
    index = bank.index.save()
    atomic_write_bytes(directory / DOCUMENTS_FILE, documents)
    atomic_write_bytes(directory / INDEX_FILE, index)
    config: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "fingerprint": bank.fingerprint,
        "learner": bank.learner,
        "embedder": bank.embedder_name,
        "embedder_sha256": bank.index.identity,
        "embedding_dim": bank.embedding_dim,
        "index_metric": INDEX_METRIC,
        "index_dtype": INDEX_DTYPE,
        "index_settings": bank.index_settings.as_dict(),
        "documents_sha256": hashlib.sha256(documents).hexdigest(),
        "index_sha256": hashlib.sha256(index).hexdigest(),
        "dtype": bank.dtype,
        "quantization": bank.format.describe(),
        "num_documents": len(placements),
        "parameter_shapes": {name: list(shape) for name, shape in bank.parameter_shapes.items()},
        "shards": [
            {**shard, "num_documents": sum(1 for s, _ in placements.values() if s == index)}
            for index, shard in enumerate(shards)
        ],
    }
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def _stamp(directory: Path) -> tuple[int, int, int] | None:
    """What changes when a swap puts another directory at `directory` (None: nothing there)."""
    try:
        status = os.stat(directory)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return status.st_dev, status.st_ino, status.st_ctime_ns


def load(
    cls: type[Bank],
    name_or_path: str | os.PathLike,
    subfolder: str | None,
    options: HubOptions,
    embedder_model,
) -> Bank:
    """[`GradientBank.from_pretrained`]: a local bank directory (see [`read_local`]), or a Hub repo's bank.

    Raises:
        [`ReGradTypeError`], [`ReGradValueError`]: `name_or_path` or `subfolder` is not a path or repo id, or the
            subfolder leaves the directory or repo (see [`regrad_hf.hub.check_subfolder`]).
    """
    local = directory_argument(name_or_path, "pretrained_bank_name_or_path") / check_subfolder(subfolder)
    if "\0" in str(local):
        raise ReGradValueError(f"subfolder {subfolder!r:.80} holds a NUL character, which no path can")
    try:  # a name too long for the filesystem is an OSError here, not a missing directory
        is_local = local.is_dir() or (local.parent.is_dir() and was_a_bank(local.absolute()))
    except OSError as error:
        raise file_error(error, local, "read the bank at") from error
    if is_local:
        return read_local(cls, local.resolve(), embedder_model)
    location = locate(name_or_path, list(EAGER_FILES), subfolder=subfolder, options=options)
    if not location.is_remote:
        return read_local(cls, location.directory.resolve(), embedder_model)
    return read(cls, location, embedder_model)


def read_local(cls: type[Bank], target: Path, embedder_model) -> Bank:
    """Reads the bank directory `target` as it is (renaming and repairing nothing), and again when a writer swapped
    another bank in while it was read, so that the bank returned is one complete bank. When a swap was cut between
    its two renames (no writer holds the lock, the journal names the previous bank), that bank is read where it is.

    Raises:
        [`BankNotFoundError`]: nothing is at `target`, and no interrupted save left a previous bank.
    """
    for attempt in range(READ_ATTEMPTS):
        source = target
        if _stamp(target) is None:
            source = interrupted_backup(target)
            if source is None:
                if _stamp(target) is not None:  # a writer finished its swap (and removed its journal) meanwhile
                    continue
                raise BankNotFoundError(
                    f"there is no bank at {target} (was it deleted?): save or build one there, or load another"
                )
            if writer_active(target):  # a writer is between its two renames: its bank is there in a moment
                time.sleep(min(0.2, 0.01 * (attempt + 1)))
                continue
        before = _stamp(source)
        try:
            bank = read(cls, Location(source), embedder_model)
        except (ReGradError, OSError) as error:
            if _stamp(source) == before:
                if isinstance(error, ReGradError):
                    raise
                raise file_error(error, Path(error.filename or source), "read") from error
        else:
            if _stamp(source) == before:
                if source != target:
                    warnings.warn(
                        f"{target}: a save into it was interrupted; read the previous bank from {source}, where it "
                        "stays until the next save there puts it back",
                        UserWarning,
                        stacklevel=3,
                    )
                return bank
        time.sleep(min(0.2, 0.01 * (attempt + 1)))
    raise ReGradFileError(
        f"{target} was being replaced by writers during all of {READ_ATTEMPTS} attempts to read it: try again"
    )


def read(cls: type[Bank], location: Location, embedder_model) -> Bank:
    """Reads the bank at `location` (a local directory or a Hub snapshot), checking every file against the others.
    Local files are never read through a symlink; a Hub snapshot's files are links into its cache by design."""
    directory = location.directory.resolve() if location.is_remote else location.directory
    follow = location.is_remote

    def data(name: str, limit: int) -> bytes:
        path = directory / name
        if not follow:
            regular_file(path, directory)
        return read_bytes(path, limit, follow)

    config_path = directory / CONFIG_FILE
    config = validate_config(checked_json(data(CONFIG_FILE, MAX_CONFIG_BYTES), f"bank file {config_path}"), config_path)
    # a bank saved before the settings were configurable was built with usearch's defaults
    settings = config.get("index_settings")
    bank = cls(
        learner=config["learner"],
        parameter_shapes=config["parameter_shapes"],
        embedder=config["embedder"],
        embedding_dim=config["embedding_dim"],
        dtype=config["dtype"],
        embedder_model=embedder_model,
        quantization=config.get("quantization"),
        embedder_identity=config.get("embedder_sha256"),
        index_settings=LEGACY_INDEX_SETTINGS if settings is None else IndexSettings(**settings),
    )
    if bank.fingerprint != config["fingerprint"]:
        raise ReGradValueError(f"{config_path}: the fingerprint field does not match the learner field (edited file?)")
    shards = [{"file": shard["file"], "sha256": shard["sha256"]} for shard in config["shards"]]
    shard_sizes = [shard["num_documents"] for shard in config["shards"]]
    for shard in shards:
        if not follow and not regular_file(directory / shard["file"], directory).is_file():
            raise ReGradValueError(f"bank file {directory / shard['file']} is missing")

    documents = data(DOCUMENTS_FILE, MAX_DOCUMENTS_BYTES)
    _check_sha256(documents, config.get("documents_sha256"), directory / DOCUMENTS_FILE)
    bank.catalogue.read(documents, directory / DOCUMENTS_FILE, shard_sizes)
    if len(bank.catalogue) != config["num_documents"]:
        raise ReGradValueError(
            f"{directory / DOCUMENTS_FILE} holds {len(bank.catalogue)} documents, "
            f"{CONFIG_FILE} says {config['num_documents']}"
        )
    index = data(INDEX_FILE, MAX_INDEX_BYTES)
    _check_sha256(index, config.get("index_sha256"), directory / INDEX_FILE)
    bank.index.load(index, directory / INDEX_FILE, list(bank.catalogue.ids_by_key))
    # A local shard is opened now: an open shard keeps its contents even if another bank later replaces the
    # file. A repo's shards are immutable files of one commit in the cache, opened when first needed.
    bank.store.attach(location, shards, shard_sizes, eager=not location.is_remote)
    return bank


def _check_sha256(data: bytes, expected: str | None, path: Path) -> None:
    """Checks a file's bytes against its checksum in bank_config.json (format version 3; older ones have none)."""
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ReGradValueError(
            f"bank file {path} does not match its checksum in {CONFIG_FILE}: it is damaged or from another bank; "
            "rebuild the bank (or restore the file)"
        )


def push(
    bank: BankParts,
    repo_id: str,
    *,
    subfolder: str | None,
    commit_message: str,
    max_shard_bytes: int,
    card_data: Mapping[str, Any] | None,
    **commit_options: Any,
):
    """[`GradientBank.push_to_hub`]: writes the bank's files to a temporary folder and pushes them with the bank's
    card in one commit, deleting the repo's shards of an earlier, larger bank. `commit_options` go to
    [`regrad_hf.hub.push_folder`] (`commit_description`, `private`, `token`, `revision`, `create_pr`)."""
    with tempfile.TemporaryDirectory() as folder:
        with bank.lock:  # one state of the bank; the upload needs no lock
            write_files(bank, Path(folder), max_shard_bytes)
        bank_config = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
        card = render_bank_card(bank_config, repo_id=repo_id, subfolder=subfolder, card_data=card_data)
        return push_folder(
            folder,
            repo_id,
            path_in_repo=subfolder or "",
            commit_message=commit_message,
            delete_patterns=[f"{GRADIENTS_DIR}/*"],
            card=card,
            **commit_options,
        )

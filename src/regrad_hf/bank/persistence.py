"""Writing a bank's files and reading them back, every file checked before it is trusted."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ReGradValueError
from ..files import DIRECTORY_MODE, atomic_write_text
from ..hub import Location
from .directory import CONFIG_FILE, DOCUMENTS_FILE, GRADIENTS_DIR, INDEX_FILE, replace_directory
from .index import INDEX_DTYPE, INDEX_METRIC
from .schema import read_json_file, validate_config

if TYPE_CHECKING:
    from .gradient_bank import GradientBank

# 2: quantised formats (int8/int4/int3/int2: `<name>.codes` and `<name>.scales` per LoRA tensor) and their parameters
# in bank_config.json ("quantization"). Version 1 banks (float formats only) read unchanged.
FORMAT_VERSION = 2

Placements = dict[str, tuple[int, int]]  # document id -> (shard, row)


def save(bank: GradientBank, save_directory: Path, max_shard_bytes: int) -> None:
    """[`GradientBank.save_pretrained`]: writes a staging directory and swaps it in whole."""
    target = save_directory.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    staging.chmod(DIRECTORY_MODE)
    try:
        placements, shards = write_files(bank, staging, max_shard_bytes)
        replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # The saved files now hold every gradient: read from them instead of memory.
    rows = [sum(1 for s, _ in placements.values() if s == index) for index in range(len(shards))]
    bank.store.attach(Location(target), shards, rows, eager=True)
    bank.store.mark_verified()  # checksummed just now, as written
    for doc_id, (shard, row) in placements.items():
        bank.catalogue[doc_id].shard, bank.catalogue[doc_id].row = shard, row
    bank.store.in_memory.clear()


def write_files(bank: GradientBank, directory: Path, max_shard_bytes: int) -> tuple[Placements, list[dict[str, str]]]:
    """Writes every bank file into `directory`. Returns where each document's gradient went, and the shards
    (file and SHA-256)."""
    per_shard = bank.store.documents_per_shard(max_shard_bytes)
    ids = bank.ids
    (directory / GRADIENTS_DIR).mkdir()
    placements: Placements = {}
    shards: list[dict[str, str]] = []
    for shard, start in enumerate(range(0, len(ids), per_shard)):
        chunk = ids[start : start + per_shard]
        tensors = {key: torch.stack([bank.row(i, key) for i in chunk]) for key in bank.stored_keys}
        shards.append(bank.store.write_shard(directory, shard, tensors))
        placements.update({doc_id: (shard, row) for row, doc_id in enumerate(chunk)})
    write_catalogue(bank, directory, placements, shards)
    return placements, shards


def write_catalogue(
    bank: GradientBank, directory: Path, placements: Mapping[str, tuple[int, int]], shards: list[dict[str, str]]
) -> None:
    """Writes documents.jsonl, index.usearch and bank_config.json (last: a directory with it is complete)."""
    atomic_write_text(directory / DOCUMENTS_FILE, bank.catalogue.lines(placements))
    bank.index.save(directory / INDEX_FILE)
    config: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "fingerprint": bank.fingerprint,
        "learner": bank.learner,
        "embedder": bank.embedder_name,
        "embedding_dim": bank.embedding_dim,
        "index_metric": INDEX_METRIC,
        "index_dtype": INDEX_DTYPE,
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


def read(cls: type[GradientBank], location: Location, embedder_model) -> GradientBank:
    """Reads the bank at `location` (a local directory or a Hub snapshot), checking every file against the others."""
    directory = location.directory.resolve()
    if not location.is_remote:
        location = Location(directory)
    config_path = directory / CONFIG_FILE
    config = validate_config(read_json_file(config_path), config_path)
    bank = cls(
        learner=config["learner"],
        parameter_shapes=config["parameter_shapes"],
        embedder=config["embedder"],
        embedding_dim=config["embedding_dim"],
        dtype=config["dtype"],
        embedder_model=embedder_model,
        quantization=config.get("quantization"),
    )
    if bank.fingerprint != config["fingerprint"]:
        raise ReGradValueError(f"{config_path}: the fingerprint field does not match the learner field (edited file?)")
    shards = [{"file": shard["file"], "sha256": shard["sha256"]} for shard in config["shards"]]
    shard_sizes = [shard["num_documents"] for shard in config["shards"]]
    for shard in shards:
        if not location.is_remote and not (directory / shard["file"]).is_file():
            raise ReGradValueError(f"bank file {directory / shard['file']} is missing")

    bank.catalogue.read(directory / DOCUMENTS_FILE, shard_sizes)
    if len(bank.catalogue) != config["num_documents"]:
        raise ReGradValueError(
            f"{directory / DOCUMENTS_FILE} holds {len(bank.catalogue)} documents, "
            f"{CONFIG_FILE} says {config['num_documents']}"
        )
    bank.index.load(directory / INDEX_FILE, list(bank.catalogue.ids_by_key), CONFIG_FILE, DOCUMENTS_FILE)
    # A local shard is opened now: an open shard keeps its contents even if another bank later replaces the
    # file. A repo's shards are immutable files of one commit in the cache, opened when first needed.
    bank.store.attach(location, shards, shard_sizes, eager=not location.is_remote)
    return bank

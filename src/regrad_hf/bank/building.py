"""Building a bank: checking documents and computing their gradients in batches, and building into a directory
shard by shard, checkpointed (see [`regrad_hf.bank.checkpoint`]), resuming an interrupted build, and with several
processes each computing a share of the shards."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..adaptation.deltas import check_documents
from ..adaptation.learner import fingerprint_of
from ..errors import BankMismatchError, ReGradError, ReGradFileError, ReGradTypeError, ReGradValueError
from ..files import DIRECTORY_MODE, atomic_save_safetensors, atomic_write_text, output_directory
from ..log import progress_bar
from . import checkpoint
from .catalogue import Document
from .directory import GRADIENTS_DIR, publish, writer_lock
from .distributed import broadcast_flags, everyone, process_rank
from .parts import Bank, GradientSource
from .persistence import write_catalogue
from .schema import MAX_TEXT_CHARS, check_storable, file_error
from .shards import check_gradients

logger = logging.getLogger(__name__)


def build_into(
    bank: Bank,
    model: GradientSource,
    documents: Sequence[str],
    ids: Sequence[str] | None,
    metadata: Sequence[Mapping[str, Any]] | None,
    batch_size: int,
    show_progress: bool,
    output_dir: str | os.PathLike,
    max_shard_bytes: int,
) -> Bank:
    """[`GradientBank.build`] with `output_dir`: shard by shard, checkpointed, resuming a previous interrupted build;
    with several processes, each computes a share of the unfinished shards and process 0 publishes the bank.

    `bank` is the empty bank to fill (its learner, format and embedder); the published bank is returned, loaded."""
    rank, world = process_rank()
    output = output_directory(output_dir, "output_dir", create=False).resolve()
    bank.store.documents_per_shard(max_shard_bytes)  # checked before any work
    ids, metadata = everyone(lambda: check_new(bank, model, documents, ids, metadata, batch_size), "checking")
    expected = checkpoint.new_state(
        bank.fingerprint,
        learner=bank.learner,
        dtype=bank.dtype,
        quantization=bank.format.describe(),
        embedder=bank.embedder_name,
        documents_digest=checkpoint.documents_digest(ids, documents, metadata),
        num_documents=len(ids),
        documents_per_shard=bank.store.documents_per_shard(max_shard_bytes),
    )
    work = checkpoint.work_directory(output)
    try:
        with contextlib.ExitStack() as stack:
            # Process 0 holds the output's writer lock for the whole build: another build or save into it waits.
            everyone(lambda: rank == 0 and stack.enter_context(writer_lock(output)) and None, "locking the output")
            _build_locked(bank, model, documents, ids, metadata, batch_size, show_progress, output, work, expected)
    except OSError as error:
        if isinstance(error, ReGradError):
            raise
        raise file_error(error, Path(error.filename or work), "write the build into") from error
    except SafetensorError as error:  # safetensors reports its I/O failures (ENOSPC included) this way
        raise ReGradFileError(f"cannot write the build into {work}: {error}") from error
    return type(bank).from_pretrained(output, embedder_model=bank.index.loaded_embedder)


def _build_locked(
    bank: Bank,
    model: GradientSource,
    documents: Sequence[str],
    ids: Sequence[str],
    metadata: Sequence[Mapping[str, Any]],
    batch_size: int,
    show_progress: bool,
    output: Path,
    work: Path,
    expected: dict[str, Any],
) -> None:
    rank, world = process_rank()

    def check() -> bool:  # read-only, so every process raises the same error itself
        found = checkpoint.find_state(output)
        if found is not None:
            checkpoint.check_same_build(found[1], expected, found[0])
        return found is not None and found[0] == output  # killed after publishing, before tidying up

    if everyone(check, "checking the build directory"):
        everyone(lambda: rank == 0 and checkpoint.remove_build_files(output), "tidying up")
        return

    num_shards = checkpoint.shard_count(expected)
    todo = everyone(lambda: _prepare_work(work, expected) if rank == 0 else [], "preparing the build")
    todo = broadcast_flags(todo, num_shards)
    mine = [shard for shard in range(num_shards) if todo[shard]][rank::world]
    mine_documents = sum(checkpoint.shard_size(expected, shard) for shard in mine)
    logger.info(
        "%s%d of %d shards (%d documents) to compute",
        f"process {rank} of {world}: " if world > 1 else "",
        len(mine),
        num_shards,
        mine_documents,
    )
    label = "Document gradients" + (f" (process {rank} of {world})" if world > 1 else "")
    with progress_bar(total=mine_documents, desc=label, enabled=show_progress and rank == 0) as progress:
        everyone(
            lambda: _build_shards(bank, model, documents, ids, batch_size, work, expected, mine, progress),
            "computing",
        )
    everyone(lambda: rank == 0 and _publish(bank, work, output, expected, ids, documents, metadata), "publishing")


def add_documents(
    bank: Bank,
    model: GradientSource,
    documents: Sequence[str],
    ids: Sequence[str] | None,
    metadata: Sequence[Mapping[str, Any]] | None,
    batch_size: int,
    show_progress: bool,
) -> list[str]:
    """[`GradientBank.add`]: checks and computes everything, then changes the bank (so a failure adds nothing).

    The slow part (embeddings, gradients) runs without the bank's lock, so that other threads keep searching; the
    ids are checked again under the lock (another thread may have added some meanwhile), and generated ones are
    chosen then. The model is never called under the lock (a model's generate holds its lock while it searches)."""
    requested = ids
    ids, metadata = check_new(bank, model, documents, ids, metadata, batch_size)
    documents = list(documents)
    embeddings = bank.index.embed(documents)
    with progress_bar(total=len(documents), desc="Document gradients", enabled=show_progress) as progress:
        stored = compute(bank, model, documents, ids, batch_size, progress)
    rows = [{key: tensor[i] for key, tensor in stored.items()} for i in range(len(documents))]

    with bank.lock:
        ids = bank.catalogue.new_ids(documents, requested)
        first = bank.catalogue.next_key
        keys = np.arange(first, first + len(documents), dtype=np.uint64)
        bank.index.add(keys, embeddings)
        for key, doc_id, text, meta, row in zip(keys.tolist(), ids, documents, metadata, rows, strict=True):
            bank.catalogue.insert(Document(id=doc_id, text=text, metadata=meta, key=key))
            bank.store.in_memory[doc_id] = row
    return list(ids)


def check_new(
    bank: Bank,
    model: GradientSource,
    documents: Sequence[str],
    ids: Sequence[str] | None,
    metadata: Sequence[Mapping[str, Any]] | None,
    batch_size: int,
) -> tuple[list[str], list[Mapping[str, Any]]]:
    """Validates documents to add (and the model); returns their ids and metadata."""
    check_documents(documents)
    too_long = [index for index, text in enumerate(documents) if len(text) > MAX_TEXT_CHARS]
    if too_long:
        raise ReGradValueError(
            f"documents {too_long[:5]} are longer than {MAX_TEXT_CHARS} characters, the limit a bank stores; "
            "split them first"
        )
    with bank.lock:  # not while another thread inserts
        ids = bank.catalogue.new_ids(documents, ids)
    metadata = bank.catalogue.check_metadata(documents, metadata)
    for index, (doc_id, text, entry) in enumerate(zip(ids, documents, metadata, strict=True)):
        check_storable(doc_id, text, entry, f"document {index} ({doc_id!r:.40})")  # a saved bank always loads
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ReGradValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_source(model)
    bank.check_learner(model)
    return ids, metadata


def check_learner(bank: Bank, model: GradientSource) -> None:
    """[`GradientBank.check_learner`]: raises [`BankMismatchError`] unless `model` is the bank's learner."""
    identity = model.learner_identity()
    if fingerprint_of(identity) != bank.fingerprint:
        differences = ", ".join(
            f"{key} (bank {str(bank.learner.get(key))[:16]}, model {str(identity.get(key))[:16]})"
            for key in sorted(set(identity) | set(bank.learner))
            if identity.get(key) != bank.learner.get(key)
        )
        raise BankMismatchError(
            f"this bank was built by learner {bank.fingerprint[:12]}, the model is learner "
            f"{fingerprint_of(identity)[:12]}; they differ in {differences}. The bank's gradients do not apply "
            "to this model: rebuild the bank with it, or attach with force=True if you know better."
        )


SOURCE_ATTRIBUTES = ("config", "learner_identity", "lora_parameters", "document_gradients")


def check_source(model: object) -> None:
    """Raises [`ReGradTypeError`] unless `model` can compute a bank's gradients (a [`ReGradForCausalLM`], or
    anything with the [`GradientSource`] attributes), before any of them is used."""
    missing = [name for name in SOURCE_ATTRIBUTES if not hasattr(model, name)]
    if missing:
        raise ReGradTypeError(
            f"model must be a ReGradForCausalLM (a GradientSource), got {type(model).__name__} without "
            f"{', '.join(missing)}"
        )


def compute(
    bank: Bank, model: GradientSource, documents: Sequence[str], ids: Sequence[str], batch_size: int, progress
) -> dict[str, torch.Tensor]:
    """The documents' gradients in the bank's format, stacked, by shard key; non-finite gradients refused."""
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(documents), batch_size):
        batch = list(documents[start : start + batch_size])
        # a GradientSource may be anyone's: its tensors are checked before anything is stored
        gradients = model.document_gradients(batch)
        stacked = check_gradients(gradients, bank.parameter_shapes, ids[start : start + batch_size])
        parts.append(bank.store.encode(stacked))
        progress.update(len(batch))
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _prepare_work(work: Path, state: dict[str, Any]) -> list[bool]:
    """Process 0: creates or tidies the work directory; returns, by shard, whether it is still to compute."""
    if not (work / checkpoint.BUILD_STATE_FILE).is_file():
        shutil.rmtree(work, ignore_errors=True)
        for folder in (GRADIENTS_DIR, checkpoint.EMBEDDINGS_DIR, checkpoint.RECORDS_DIR):
            (work / folder).mkdir(parents=True, mode=DIRECTORY_MODE)
        atomic_write_text(work / checkpoint.BUILD_STATE_FILE, json.dumps(state, indent=2) + "\n")
    checkpoint.remove_stray_files(work)
    finished = checkpoint.finished_shards(work, state)
    return [shard not in finished for shard in range(checkpoint.shard_count(state))]


def _build_shards(
    bank: Bank,
    model: GradientSource,
    documents: Sequence[str],
    ids: Sequence[str],
    batch_size: int,
    work: Path,
    state: Mapping[str, Any],
    shards: Sequence[int],
    progress,
) -> None:
    """Computes and writes `shards` (numbers) into the work directory, each finished by its record."""
    per_shard = state["documents_per_shard"]
    for shard in shards:
        chunk = slice(shard * per_shard, (shard + 1) * per_shard)
        tensors = compute(bank, model, documents[chunk], ids[chunk], batch_size, progress)
        embeddings = torch.from_numpy(bank.index.embed(list(documents[chunk])))
        record = bank.store.write_shard(work, shard, tensors)
        relative = f"{checkpoint.EMBEDDINGS_DIR}/shard-{shard:05d}.safetensors"
        atomic_save_safetensors({"embeddings": embeddings}, work / relative)
        record.update(embeddings=relative, embeddings_sha256=checkpoint.file_sha256(work / relative))
        checkpoint.write_record(work, shard, record)


def _publish(
    bank: Bank,
    work: Path,
    output: Path,
    state: Mapping[str, Any],
    ids: Sequence[str],
    documents: Sequence[str],
    metadata: Sequence[Mapping[str, Any]],
) -> None:
    """Process 0, every shard finished: writes the catalogue and index and swaps the work directory in."""
    num_shards = checkpoint.shard_count(state)
    # Checksums were verified (or computed) as the shards were resumed or written; here only their presence.
    records = checkpoint.finished_shards(work, state, verify=False)
    missing = [shard for shard in range(num_shards) if shard not in records]
    if missing:
        raise ReGradValueError(
            f"shards {missing[:5]} of the build in {work} are not there although their processes finished: with "
            "several machines, the output directory must be on a filesystem that every process sees"
        )
    per_shard = state["documents_per_shard"]
    placements = {doc_id: (index // per_shard, index % per_shard) for index, doc_id in enumerate(ids)}
    for key, (doc_id, text, meta) in enumerate(zip(ids, documents, metadata, strict=True)):
        bank.catalogue.insert(Document(doc_id, text, dict(meta), key, *placements[doc_id]))
    for shard in range(num_shards):
        with safe_open(str(work / records[shard]["embeddings"]), framework="np") as stored:
            vectors = stored.get_tensor("embeddings")
        start = shard * per_shard
        bank.index.add(np.arange(start, start + len(vectors), dtype=np.uint64), vectors)
    shards = [{"file": records[shard]["file"], "sha256": records[shard]["sha256"]} for shard in range(num_shards)]
    write_catalogue(bank, work, placements, shards)
    bank.catalogue.clear()
    publish(work, output)
    checkpoint.remove_build_files(output)

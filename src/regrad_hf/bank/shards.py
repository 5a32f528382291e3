"""Where a bank's gradients are: rows held in memory until saved, and safetensors shards on disk (or in a Hub repo),
opened lazily, checked against the bank's layout, and checksummed before their first row is used."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import ReGradValueError
from ..files import atomic_save_safetensors
from ..hub import Location
from .directory import CONFIG_FILE, GRADIENTS_DIR, regular_file, sha256_of
from .quantization import GradientFormat
from .schema import check_safetensors_header


class ShardStore:
    """The stored gradient tensors of a bank, by document.

    Args:
        parameter_shapes (`Mapping[str, tuple[int, ...]]`): shape of each LoRA tensor, by name.
        format ([`GradientFormat`]): how gradients are stored.
        fingerprint (`str`): the learner fingerprint, written into each shard's metadata.
    """

    def __init__(self, parameter_shapes: Mapping[str, tuple[int, ...]], format: GradientFormat, fingerprint: str):
        self.parameter_shapes = dict(parameter_shapes)
        self.format = format
        self.fingerprint = fingerprint
        # stored tensors (by shard key: name + format suffix) of documents not yet saved
        self.in_memory: dict[str, dict[str, torch.Tensor]] = {}
        # Shards by index: their files (relative to the bank), rows used, checksums, and once opened, the
        # safetensors reader and a plain handle on the same file (to checksum what the reader maps).
        self._location: Location | None = None  # where the shard files are (downloaded on first use from a repo)
        self._local = True
        self._files: list[str] = []
        self._rows: list[int] = []
        self._checksums: list[str] = []
        self._readers: list[Any | None] = []
        self._handles: list[Any | None] = []
        self._verified: set[int] = set()

    @property
    def stored_keys(self) -> list[str]:
        """The names of the tensors in a shard (LoRA tensor names, with the format's suffixes)."""
        return [name + suffix for name in self.parameter_shapes for suffix in self.format.suffixes]

    @property
    def bytes_per_document(self) -> int:
        """Bytes one document's gradients take in a shard (data only: codes and scales, no file header)."""
        return self.format.bytes_per_document(self.parameter_shapes)

    def documents_per_shard(self, max_shard_bytes: int) -> int:
        return max(1, max_shard_bytes // max(1, self.bytes_per_document))

    def encode(self, stacked: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stacked float gradients -> the stored tensors of the bank's format, by shard key."""
        return {
            name + suffix: tensor
            for name, gradients in stacked.items()
            for suffix, tensor in self.format.encode(gradients).items()
        }

    def decode(self, rows: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        """Stored rows (by shard key) of LoRA tensor `name` -> float gradients of shape `(rows, *shape)`."""
        parts = {suffix: rows[name + suffix] for suffix in self.format.suffixes}
        return self.format.decode(parts, self.parameter_shapes[name])

    def attach(self, location: Location, shards: list[dict[str, str]], shard_sizes: list[int], eager: bool) -> None:
        """Points the store at its shard files (with their row counts from bank_config.json); opens them all now if
        `eager`, else each on its first use."""
        self._location = location
        self._local = not location.is_remote
        self._files = [shard["file"] for shard in shards]
        self._rows = list(shard_sizes)
        self._checksums = [shard["sha256"] for shard in shards]
        self._readers, self._handles = [None] * len(shards), [None] * len(shards)
        self._verified = set()
        for index in range(len(shards) if eager else 0):
            self._open(index)

    def mark_verified(self) -> None:
        """Every shard was checksummed as it was written."""
        self._verified = set(range(len(self._files)))

    def _open(self, index: int) -> None:
        """Opens (memory-maps) one shard, downloading it first if the bank is in a Hub repo, and checks its header
        against the bank: header size, tensor names, dtypes, row shapes and row counts. An open shard keeps its
        contents even if another bank later replaces the file on disk, so a bank never reads rows written for a
        different layout. Its checksum is verified separately, before its first row is used (see `row`)."""
        path = self._location.fetch(self._files[index])
        if self._local:  # a Hub snapshot's files are links into its cache; a local bank's never are
            regular_file(path, self._location.directory)
        check_safetensors_header(path)
        try:
            reader = safe_open(str(path), framework="pt", device="cpu")
        except Exception as error:  # safetensors raises its own error type for a bad header
            raise ReGradValueError(f"bank file {path} is not a readable safetensors file: {error}") from error
        expected = {
            name + suffix: spec
            for name, shape in self.parameter_shapes.items()
            for suffix, spec in self.format.specs(shape).items()
        }
        if set(reader.keys()) != set(expected):
            raise ReGradValueError(
                f"bank file {path} holds other tensors than the bank's LoRA tensors in format {self.format.name}"
            )
        rows = self._rows[index]
        for key, (dtype, row_shape) in expected.items():
            tensor = reader.get_slice(key)
            if tensor.get_dtype() != dtype or tensor.get_shape()[1:] != list(row_shape):
                raise ReGradValueError(
                    f"bank file {path}: tensor {key} is {tensor.get_dtype()} {tensor.get_shape()}, expected "
                    f"{dtype} [rows, {', '.join(map(str, row_shape))}]"
                )
            if tensor.get_shape()[0] != rows:
                raise ReGradValueError(
                    f"bank file {path}: {key} has {tensor.get_shape()[0]} rows, {CONFIG_FILE} says {rows}"
                )
        self._readers[index] = reader
        flags = os.O_RDONLY | (getattr(os, "O_NOFOLLOW", 0) if self._local else 0)
        self._handles[index] = os.fdopen(os.open(path, flags), "rb")  # held open for the bank's life, like the mmap

    def _verify(self, index: int) -> None:
        """Checks a shard's SHA-256 against bank_config.json once, before its first row is used: a flipped bit in
        the gradient data would otherwise go unnoticed."""
        handle = self._handles[index]
        handle.seek(0)
        if sha256_of(handle) != self._checksums[index]:
            raise ReGradValueError(
                f"bank file {self._location.describe(self._files[index])} does not match its checksum in "
                f"{CONFIG_FILE}: it is corrupted; rebuild it"
            )
        self._verified.add(index)

    def row(self, doc_id: str, shard: int | None, row: int | None, key: str) -> torch.Tensor:
        """One document's row of a stored tensor (`key` = LoRA tensor name + format suffix), as stored."""
        if doc_id in self.in_memory:
            return self.in_memory[doc_id][key]
        if shard not in self._verified:
            if self._readers[shard] is None:
                self._open(shard)
            self._verify(shard)
        return self._readers[shard].get_slice(key)[row : row + 1][0]

    def write_shard(self, directory: Path, shard: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
        """Writes one shard (atomically) into `directory`; returns its file name and SHA-256."""
        relative = f"{GRADIENTS_DIR}/shard-{shard:05d}.safetensors"
        # one metadata key: safetensors writes several in a per-process random order, and shards should be
        # byte-for-byte reproducible (a resumed build equals an uninterrupted one)
        metadata = {"fingerprint": self.fingerprint}
        atomic_save_safetensors(tensors, directory / relative, metadata=metadata)
        with open(directory / relative, "rb") as written:
            return {"file": relative, "sha256": sha256_of(written)}


def check_finite(stacked: Mapping[str, torch.Tensor], ids: Sequence[str], where: str = "") -> None:
    """Raises [`ReGradValueError`] naming the documents whose gradients hold NaN or inf values."""
    bad = set()
    for tensor in stacked.values():
        finite = torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
        bad.update(index for index in range(len(ids)) if not finite[index])
    if bad:
        names = [ids[index] for index in sorted(bad)]
        raise ReGradValueError(f"the gradients of documents {names[:5]} contain NaN or inf values{where}")

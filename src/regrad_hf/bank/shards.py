"""Where a bank's gradients are: rows held in memory until saved, and safetensors shards on disk (or in a Hub repo),
opened lazily, checked against the bank's layout, and checksummed before their first row is used."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from ..errors import ReGradValueError
from ..files import atomic_save_safetensors
from ..hub.repos import Location
from .directory import CONFIG_FILE, GRADIENTS_DIR, regular_file, sha256_of
from .mapped import MappedShard
from .quantization import FloatFormat, GradientFormat


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
        # Shards by index: their files (relative to the bank), rows used, checksums, and once opened, the mapped
        # file and a view of each stored tensor in it.
        self._location: Location | None = None  # where the shard files are (downloaded on first use from a repo)
        self._local = True
        self._files: list[str] = []
        self._rows: list[int] = []
        self._checksums: list[str] = []
        self._mapped: list[MappedShard | None] = []
        self._views: list[dict[str, torch.Tensor] | None] = []
        self._verified: set[int] = set()
        self._lock = threading.Lock()

    @property
    def stored_keys(self) -> list[str]:
        """The names of the tensors in a shard (LoRA tensor names, with the format's suffixes)."""
        return [name + suffix for name in self.parameter_shapes for suffix in self.format.suffixes]

    @property
    def bytes_per_document(self) -> int:
        """Bytes one document's gradients take in a shard (data only: codes and scales, no file header)."""
        return self.format.bytes_per_document(self.parameter_shapes)

    def documents_per_shard(self, max_shard_bytes: int) -> int:
        """How many documents a shard of at most `max_shard_bytes` holds (at least one: `0` means one per shard).

        Raises:
            [`ReGradValueError`]: `max_shard_bytes` is not a non-negative integer (a bool, a float, `None`, `-1`).
        """
        if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes < 0:
            raise ReGradValueError(
                f"max_shard_bytes must be a non-negative integer (0: one document per shard), "
                f"got {max_shard_bytes!r:.40}"
            )
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

    def decode_all(self, rows: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Stored rows (by shard key) of every LoRA tensor -> `({name: float gradients (rows, *shape)}, blocks)`.

        A quantised format decodes the tensors of one shape together (one decode of their concatenated rows, the
        results are consecutive slices of it): the same values as one decode each, with a few dozen fewer small
        ops per request. `blocks` are the tensors the results are slices of (for one finiteness check each).
        """
        if isinstance(self.format, FloatFormat):
            gathered = {name: self.decode(rows, name) for name in self.parameter_shapes}
            return gathered, list(gathered.values())
        by_shape: dict[tuple[int, ...], list[str]] = {}
        for name, shape in self.parameter_shapes.items():
            by_shape.setdefault(tuple(shape), []).append(name)
        gathered, blocks = {}, []
        for shape, names in by_shape.items():
            parts = {
                suffix: torch.cat([rows[name + suffix] for name in names])
                if len(names) > 1
                else rows[names[0] + suffix]
                for suffix in self.format.suffixes
            }
            block = self.format.decode(parts, shape)
            blocks.append(block)
            gathered.update(zip(names, block.chunk(len(names)), strict=True))
        return gathered, blocks

    def attach(self, location: Location, shards: list[dict[str, str]], shard_sizes: list[int], eager: bool) -> None:
        """Points the store at its shard files (with their row counts from bank_config.json); opens them all now if
        `eager`, else each on its first use.

        All or nothing: if a shard fails to open, the store still reads the shards it read before (a save that
        fails after publishing must not leave the catalogue's rows pointing into the new files)."""
        previous = self._location, self._local, self._files, self._rows, self._checksums, self._mapped, self._views
        verified = self._verified
        self._location = location
        self._local = not location.is_remote
        self._files = [shard["file"] for shard in shards]
        self._rows = list(shard_sizes)
        self._checksums = [shard["sha256"] for shard in shards]
        self._mapped, self._views = [None] * len(shards), [None] * len(shards)
        self._verified = set()
        try:
            for index in range(len(shards) if eager else 0):
                self._open(index)
        except BaseException:
            self._location, self._local, self._files, self._rows, self._checksums, self._mapped, self._views = previous
            self._verified = verified
            raise

    def mark_verified(self) -> None:
        """Every shard was checksummed as it was written."""
        self._verified = set(range(len(self._files)))

    def _open(self, index: int) -> None:
        """Opens (memory-maps) one shard, downloading it first if the bank is in a Hub repo, and checks its header
        against the bank: header size, tensor names, dtypes, row shapes and row counts. The shard is mapped from the
        descriptor opened here, so an open shard keeps its contents even if another bank later replaces the file
        on disk, and a bank never reads rows written for a different layout. Its checksum is verified separately,
        over the same mapping, before its first row is used (see `gather`)."""
        path = self._location.fetch(self._files[index])
        if self._local:  # a Hub snapshot's files are links into its cache; a local bank's never are
            regular_file(path, self._location.directory)
        mapped = MappedShard(path, follow_symlinks=not self._local)
        expected = {
            name + suffix: spec
            for name, shape in self.parameter_shapes.items()
            for suffix, spec in self.format.specs(shape).items()
        }
        if set(mapped.specs) != set(expected):
            raise ReGradValueError(
                f"bank file {path} holds other tensors than the bank's LoRA tensors in format {self.format.name}"
            )
        rows = self._rows[index]
        for key, (dtype, row_shape) in expected.items():
            found_dtype, shape = mapped.specs[key]
            if found_dtype != dtype or shape[1:] != list(row_shape):
                raise ReGradValueError(
                    f"bank file {path}: tensor {key} is {found_dtype} {shape}, expected "
                    f"{dtype} [rows, {', '.join(map(str, row_shape))}]"
                )
            if not shape or shape[0] != rows:
                raise ReGradValueError(
                    f"bank file {path}: {key} has {shape[0] if shape else 0} rows, {CONFIG_FILE} says {rows}"
                )
        # each stored tensor viewed once, in place; views stay inside the store (gather copies rows out)
        self._views[index] = {key: mapped.view(key) for key in expected}
        self._mapped[index] = mapped

    def _verify(self, index: int) -> None:
        """Checks a shard's SHA-256 against bank_config.json once, before its first row is used: a flipped bit in
        the gradient data would otherwise go unnoticed. The checksum covers the mapping the rows are read from."""
        if self._mapped[index].sha256() != self._checksums[index]:
            raise ReGradValueError(
                f"bank file {self._location.describe(self._files[index])} does not match its checksum in "
                f"{CONFIG_FILE}: it is corrupted; rebuild it"
            )
        self._verified.add(index)

    def _ready(self, index: int) -> dict[str, torch.Tensor]:
        """The views of a shard's stored tensors, opened and checksummed first if they are not yet."""
        if index not in self._verified or self._views[index] is None:
            with self._lock:  # one thread opens and verifies a lazily opened (Hub) shard; others wait for it
                if self._views[index] is None:
                    self._open(index)
                if index not in self._verified:
                    self._verify(index)
        return self._views[index]

    def gather(self, documents: Sequence[tuple[str, int | None, int | None]]) -> dict[str, torch.Tensor]:
        """The stored rows of documents, stacked in their order, by shard key: fresh tensors, never views of a
        shard.

        Rows are read with one `index_select` per stored tensor and shard over all the rows the request needs (a
        document not yet saved comes from memory). Every shard is opened and checksummed before any row is read.

        Args:
            documents (`Sequence[tuple[str, int | None, int | None]]`): each document's id, shard and row.

        Returns:
            `dict[str, torch.Tensor]`: per shard key, a tensor of shape `(len(documents), *row_shape)`.
        """
        by_shard: dict[int, tuple[list[int], list[int]]] = {}
        in_memory: list[tuple[int, str]] = []
        for position, (doc_id, shard, row) in enumerate(documents):
            if doc_id in self.in_memory:
                in_memory.append((position, doc_id))
            else:
                positions, rows = by_shard.setdefault(shard, ([], []))
                positions.append(position)
                rows.append(row)
        sources = [
            (torch.tensor(positions), self._ready(shard), torch.tensor(rows))
            for shard, (positions, rows) in by_shard.items()
        ]
        memory_positions = torch.tensor([position for position, _ in in_memory])
        gathered = {}
        for key in self.stored_keys:
            pieces = [(positions, views[key].index_select(0, rows)) for positions, views, rows in sources]
            if in_memory:
                pieces.append((memory_positions, torch.stack([self.in_memory[doc_id][key] for _, doc_id in in_memory])))
            if len(pieces) == 1:  # one source: its rows are already in the caller's order
                gathered[key] = pieces[0][1]
                continue
            first = pieces[0][1]
            out = torch.empty((len(documents), *first.shape[1:]), dtype=first.dtype)
            for positions, piece in pieces:
                out.index_copy_(0, positions, piece)
            gathered[key] = out
        return gathered

    def write_shard(self, directory: Path, shard: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
        """Writes one shard (atomically) into `directory`; returns its file name and SHA-256."""
        relative = f"{GRADIENTS_DIR}/shard-{shard:05d}.safetensors"
        # one metadata key: safetensors writes several in a per-process random order, and shards should be
        # byte-for-byte reproducible (a resumed build equals an uninterrupted one)
        metadata = {"fingerprint": self.fingerprint}
        atomic_save_safetensors(tensors, directory / relative, metadata=metadata)
        with open(directory / relative, "rb") as written:
            return {"file": relative, "sha256": sha256_of(written)}


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value is finite, for sure when it says so: a sum is a fast reduction and is NaN or inf whenever
    a value is (it can also overflow from finite values, so `False` only means "check each document")."""
    sums = torch.stack([tensor.sum().float() for tensor in tensors])  # summed in their dtype: no conversion pass
    return bool(torch.isfinite(sums).all())


def check_finite(stacked: Mapping[str, torch.Tensor], ids: Sequence[str], where: str = "") -> None:
    """Raises [`ReGradValueError`] naming the documents whose gradients hold NaN or inf values."""
    if all_finite(stacked.values()):
        return
    bad = torch.zeros(len(ids), dtype=torch.bool)
    for tensor in stacked.values():
        bad |= ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        names = [ids[index] for index in bad.nonzero().flatten().tolist()]
        raise ReGradValueError(f"the gradients of documents {names[:5]} contain NaN or inf values{where}")


def check_gradients(
    stacked: object, shapes: Mapping[str, tuple[int, ...]], ids: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The stacked gradients a [`GradientSource`] computed for `ids`, checked against the bank's layout before they
    are stored (a wrong tensor would otherwise be accepted and make the bank fail later, when saved or gathered),
    detached.

    Raises:
        [`ReGradValueError`]: `stacked` is not a mapping of exactly the bank's LoRA tensor names to real
            floating-point torch tensors with data (not on the meta device) of shape `(len(ids), *shape)`, or a
            value is NaN or infinite (the documents are named).
    """
    if not isinstance(stacked, Mapping):
        raise ReGradValueError(f"document_gradients must return a dict of tensors, got {type(stacked).__name__}")
    missing, extra = sorted(set(shapes) - set(stacked)), sorted(map(str, set(stacked) - set(shapes)))
    if missing or extra:
        raise ReGradValueError(
            f"document_gradients returned other tensors than the bank's (missing {missing[:3]}, unexpected "
            f"{extra[:3]}): the model is not the learner this bank is for"
        )
    checked = {}
    for name, shape in shapes.items():
        tensor, expected = stacked[name], (len(ids), *shape)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.is_meta:
            found = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            where = " on the meta device" if isinstance(tensor, torch.Tensor) and tensor.is_meta else ""
            raise ReGradValueError(f"the gradient of {name} is {found}{where}, expected a floating-point tensor")
        if tuple(tensor.shape) != expected:
            raise ReGradValueError(
                f"the gradient of {name} has shape {tuple(tensor.shape)}, expected {expected} ({len(ids)} documents)"
            )
        checked[name] = tensor.detach()
    check_finite(checked, ids)
    return checked

"""A safetensors shard memory-mapped once from the file descriptor the bank opened, its tensors viewed in place.

`safetensors.safe_open` maps a file by its *path*; a bank needs the mapping, the header it checks and the bytes it
checksums to be the same file, even if another process replaces the path in between. So the bank opens the file
once (without following a symlink for a local bank), maps that descriptor, parses the header from the mapping
(the safetensors format: an 8-byte little-endian header length, a JSON header, the data) and hands out
`torch.frombuffer` views of each tensor, with no copy. The mapping is private (copy-on-write): nothing written to a
view could reach the file, and views never leave the bank ([`ShardStore.gather`] returns fresh tensors).
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import stat
from pathlib import Path
from typing import Any

import torch

from ..errors import ReGradFileError, ReGradValueError
from .schema import MAX_SAFETENSORS_HEADER_BYTES, MAX_TENSOR_RANK, checked_json, file_error

# safetensors dtype -> (torch dtype, bytes per element); only what a bank file can legitimately hold is viewable,
# other dtypes are still parsed so that a wrong one is reported by name
_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "F64": (None, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (None, 8),
    "I32": (None, 4),
    "I16": (None, 2),
    "I8": (None, 1),
    "U64": (None, 8),
    "U32": (None, 4),
    "U16": (None, 2),
    "U8": (torch.uint8, 1),
    "BOOL": (None, 1),
}


class MappedShard:
    """One safetensors file, mapped from one descriptor; its header parsed and bounds-checked.

    Args:
        path (`Path`): the file.
        follow_symlinks (`bool`): whether the file may be reached through a symlink (a Hub cache's snapshot links
            to its blobs; a local bank's files never are links).

    Attributes:
        specs (`dict[str, tuple[str, list[int]]]`): per tensor, its safetensors dtype and shape.
    """

    def __init__(self, path: Path, follow_symlinks: bool):
        self.path = path
        flags = os.O_RDONLY | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0))
        try:
            descriptor = os.open(path, flags)
        except FileNotFoundError:
            raise ReGradValueError(f"bank file {path} is missing") from None
        except OSError as error:
            raise file_error(error, path, "read") from error
        try:
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                raise ReGradFileError(f"bank file {path} is not a regular file")
            size = status.st_size
            if size < 8:
                raise self._unreadable(f"{size} bytes, truncated")
            # mmap keeps its own duplicate of the descriptor: the mapping outlives ours and any rename of the path
            self._map = mmap.mmap(descriptor, size, access=mmap.ACCESS_COPY)
        finally:
            os.close(descriptor)
        self.specs, self._offsets = self._parse_header(size)

    def _unreadable(self, problem: str) -> ReGradValueError:
        return ReGradValueError(f"bank file {self.path} is not a readable safetensors file: {problem}")

    def _parse_header(self, size: int) -> tuple[dict[str, tuple[str, list[int]]], dict[str, tuple[int, int]]]:
        length = int.from_bytes(self._map[:8], "little")
        if length > MAX_SAFETENSORS_HEADER_BYTES:
            raise ReGradValueError(
                f"bank file {self.path} declares a safetensors header of {length} bytes, more than the limit of "
                f"{MAX_SAFETENSORS_HEADER_BYTES}: refusing to read it"
            )
        if 8 + length > size:
            raise self._unreadable(f"its header needs {8 + length} bytes, the file has {size} (truncated)")
        header = checked_json(self._map[8 : 8 + length], f"the safetensors header of bank file {self.path}")
        if not isinstance(header, dict):
            raise self._unreadable("its header is not a JSON object")
        header.pop("__metadata__", None)
        specs, spans = {}, []
        for name, entry in header.items():
            dtype, shape, begin, end = self._entry(name, entry)
            if end - begin != math.prod(shape) * _DTYPES[dtype][1]:
                raise self._unreadable(f"tensor {name} spans {end - begin} bytes, its dtype and shape need another")
            specs[name] = (dtype, shape)
            spans.append((begin, end, name))
        # the data is the tensors back to back, nothing between or after them (as safetensors itself requires)
        position = 0
        for begin, end, name in sorted(spans):
            if begin != position:
                raise self._unreadable(f"tensor {name} starts at byte {begin} of the data, expected {position}")
            position = end
        data = size - 8 - length
        if position != data:
            raise self._unreadable(f"its tensors take {position} bytes, the file holds {data} (truncated?)")
        return specs, {name: (8 + length + begin, end - begin) for begin, end, name in spans}

    def _entry(self, name: str, entry: Any) -> tuple[str, list[int], int, int]:
        """A header entry's dtype, shape and data span, checked for type and range."""
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise self._unreadable(f"header entry {name!r} is not a tensor entry (dtype, shape, data_offsets)")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]

        def is_count(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0

        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise self._unreadable(f"tensor {name} has unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or len(shape) > MAX_TENSOR_RANK + 1 or not all(map(is_count, shape)):
            raise self._unreadable(f"tensor {name} has a malformed shape")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(is_count, offsets)):
            raise self._unreadable(f"tensor {name} has malformed data offsets")
        begin, end = offsets
        if end < begin:
            raise self._unreadable(f"tensor {name} ends before it starts")
        return dtype, shape, begin, end

    def sha256(self) -> str:
        """SHA-256 (hex) of the mapped bytes: exactly what the views read."""
        return hashlib.sha256(memoryview(self._map)).hexdigest()

    def view(self, name: str) -> torch.Tensor:
        """Tensor `name` as a view of the mapping (no copy); it must never be handed out or written to."""
        dtype, shape = self.specs[name]
        torch_dtype = _DTYPES[dtype][0]
        if torch_dtype is None:
            raise self._unreadable(f"tensor {name} is {dtype}, which a bank never stores")
        offset, nbytes = self._offsets[name]
        if nbytes == 0:  # frombuffer refuses an empty range
            return torch.empty(shape, dtype=torch_dtype)
        flat = torch.frombuffer(self._map, dtype=torch_dtype, count=nbytes // _DTYPES[dtype][1], offset=offset)
        return flat.view(shape)

"""How a [`GradientBank`] stores gradients: floating point, or integer codes with per-group scales.

| format     | stored per LoRA tensor and document                           | bytes per value | vs float32 |
|------------|---------------------------------------------------------------|-----------------|------------|
| `float32`  | the values                                                    | 4               | 1          |
| `float16`, `bfloat16` | the values                                         | 2               | 1/2        |
| `int8`     | int8 codes, one bf16 scale per matrix row (the last axis)     | 1 + 2/row       | ~1/4       |
| `int4`     | 4-bit codes packed two per byte, one bf16 scale per 64 values | 0.5 + 2/64      | 1/7.5      |
| `int3`     | 3-bit codes packed eight per three bytes, one bf16 scale per 32 values | 0.375 + 2/32 | 1/9.1 |
| `int2`     | 2-bit codes (-1, 0, 1) packed four per byte, one bf16 scale per 32 values | 0.25 + 2/32 | 1/12.8 |

Quantisation is symmetric ("absmax"): a group of values `x` is stored as `round(x / s)` with
`s = max|x| / (2^(bits-1) - 1)`, so zero stays exactly zero and every value is off by at most half a step `s / 2`.
The scale is rounded *up* to bf16, so no value is clipped and the half-step bound holds for the stored scale.
Codes are kept unsigned (offset by `2^(bits-1)`) and packed into `uint8` little-endian words; each document's row
of a tensor is a row of the stored arrays, so a gather reads only the rows it needs from a memory-mapped shard.

In a shard, a float format stores the tensor under the LoRA tensor's name; a quantised one stores
`<name>.codes` (`uint8`, one row per document) and `<name>.scales` (`bfloat16`, one row per document).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import BANK_DTYPES
from ..errors import ReGradValueError

FLOAT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# name -> (bits, values per scale; None = one scale per matrix row)
QUANTIZED_FORMATS: dict[str, tuple[int, int | None]] = {
    "int8": (8, None),
    "int4": (4, 64),
    "int3": (3, 32),
    "int2": (2, 32),
}
SCALE_DTYPE = torch.bfloat16
MAX_GROUP_SIZE = 1 << 16

_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.uint8: "U8"}


class GradientFormat:
    """Turns stacked gradients `(documents, *shape)` into the tensors a shard stores, and back.

    A stored tensor is named `name + suffix` for each suffix of [`GradientFormat.suffixes`]; its first axis is the
    document axis.
    """

    name: str
    suffixes: tuple[str, ...]

    def encode(self, stacked: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stored tensors (by suffix) of a float tensor of shape `(documents, *shape)`."""
        raise NotImplementedError

    def decode(self, parts: Mapping[str, torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
        """The gradients `(documents, *shape)` of stored tensors (by suffix), as [`encode`] wrote them."""
        raise NotImplementedError

    def specs(self, shape: Sequence[int]) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Per suffix, the safetensors dtype and the shape of one document's row of a tensor of shape `shape`."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any] | None:
        """What `bank_config.json` records about the format beyond its name (`None` for float formats)."""
        return None

    def bytes_per_document(self, shapes: Mapping[str, Sequence[int]]) -> int:
        """Bytes of one document's gradients in a shard (codes and scales; headers excluded)."""
        total = 0
        for shape in shapes.values():
            for dtype, row_shape in self.specs(shape).values():
                total += math.prod(row_shape) * _itemsize(dtype)
        return total


@dataclass(frozen=True)
class FloatFormat(GradientFormat):
    """Gradients cast to a floating-point dtype (`float32`, `float16`, `bfloat16`)."""

    name: str
    suffixes: tuple[str, ...] = ("",)

    @property
    def dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.name]

    def encode(self, stacked: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"": stacked.detach().to("cpu", self.dtype)}

    def decode(self, parts: Mapping[str, torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
        return parts[""]

    def specs(self, shape: Sequence[int]) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"": (_SAFETENSORS_DTYPES[self.dtype], tuple(shape))}


@dataclass(frozen=True)
class QuantizedFormat(GradientFormat):
    """Symmetric integer codes of `bits` bits with one bf16 scale per `group_size` consecutive values of a
    document's tensor (flattened; the last group is zero-padded). `group_size=None` means one scale per matrix row.

    Args:
        name (`str`): the format's name (`"int8"`, `"int4"`, `"int3"`, `"int2"`).
        bits (`int`): bits per code, 2 to 8.
        group_size (`int`, *optional*): values per scale; a multiple of the values packed per word.
    """

    name: str
    bits: int
    group_size: int | None = None
    suffixes: tuple[str, ...] = (".codes", ".scales")

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ReGradValueError(f"quantisation bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.group_size is not None and (
            not isinstance(self.group_size, int)
            or not 0 < self.group_size <= MAX_GROUP_SIZE
            or self.group_size % self.values_per_word
        ):
            raise ReGradValueError(
                f"quantisation group_size must be a positive multiple of {self.values_per_word} up to "
                f"{MAX_GROUP_SIZE} (or None: one scale per row), got {self.group_size!r}"
            )

    @property
    def levels(self) -> int:
        """The largest code magnitude: codes run from `-levels` to `levels`."""
        return 2 ** (self.bits - 1) - 1

    @property
    def values_per_word(self) -> int:
        """Codes packed together into whole bytes (8 for 3 bits: eight codes in three bytes)."""
        return 8 // math.gcd(self.bits, 8)

    @property
    def bytes_per_word(self) -> int:
        return self.values_per_word * self.bits // 8

    def _layout(self, shape: Sequence[int]) -> tuple[int, int]:
        """(group size, number of groups) for a tensor of shape `shape`."""
        numel = math.prod(shape)
        group = self.group_size or shape[-1]
        # a row-wise group must still fill whole words
        group = -(-group // self.values_per_word) * self.values_per_word
        return group, -(-numel // group)

    def specs(self, shape: Sequence[int]) -> dict[str, tuple[str, tuple[int, ...]]]:
        group, groups = self._layout(shape)
        return {
            ".codes": ("U8", (groups * group // self.values_per_word * self.bytes_per_word,)),
            ".scales": (_SAFETENSORS_DTYPES[SCALE_DTYPE], (groups,)),
        }

    def describe(self) -> dict[str, Any]:
        return {"method": "absmax", "bits": self.bits, "group_size": self.group_size, "scale_dtype": "bfloat16"}

    def encode(self, stacked: torch.Tensor) -> dict[str, torch.Tensor]:
        documents, shape = stacked.shape[0], stacked.shape[1:]
        group, groups = self._layout(shape)
        flat = stacked.detach().to("cpu", torch.float32).reshape(documents, -1)
        grouped = F.pad(flat, (0, groups * group - flat.shape[1])).view(documents, groups, group)
        scales = _round_up_to_bfloat16(grouped.abs().amax(dim=-1) / self.levels)
        divisor = scales.float().masked_fill(scales == 0, 1.0).unsqueeze(-1)
        codes = torch.round(grouped / divisor).clamp_(-self.levels, self.levels).to(torch.int32)
        return {".codes": self._pack(codes.view(documents, -1) + 2 ** (self.bits - 1)), ".scales": scales}

    def decode(self, parts: Mapping[str, torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
        scales = parts[".scales"]
        documents = scales.shape[0]
        group, groups = self._layout(shape)
        values = self._signed(self._unpack(parts[".codes"])).float().view(documents, groups, group)
        values.mul_(scales.float().unsqueeze(-1))
        return values.view(documents, -1)[:, : math.prod(shape)].reshape(documents, *shape)

    def _pack(self, unsigned: torch.Tensor) -> torch.Tensor:
        """`(documents, n)` codes in `[0, 2^bits)` -> `(documents, n * bits / 8)` bytes, little-endian words."""
        per_word = self.values_per_word
        shifts = torch.arange(per_word, dtype=torch.int64) * self.bits
        words = (unsigned.view(unsigned.shape[0], -1, per_word).to(torch.int64) << shifts).sum(dim=-1)
        byte_shifts = torch.arange(self.bytes_per_word, dtype=torch.int64) * 8
        packed = (words.unsqueeze(-1) >> byte_shifts) & 0xFF
        return packed.to(torch.uint8).view(unsigned.shape[0], -1)

    def _signed(self, codes: torch.Tensor) -> torch.Tensor:
        """Unsigned codes -> `code - 2^(bits-1)`, exactly, in the narrowest integer type: subtracting before the
        float conversion saves a pass over the float values and gives the same floats."""
        if codes.dtype != torch.uint8:
            return codes.sub_(2 ** (self.bits - 1))
        if self.bits == 8:  # code - 128 is the int8 reading of code with its top bit flipped
            return (codes ^ 0x80).view(torch.int8)
        return codes.view(torch.int8).sub_(2 ** (self.bits - 1))  # codes < 128: the same values as int8

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Inverse of [`_pack`]: `(documents, bytes)` -> `(documents, n)` codes in `[0, 2^bits)`."""
        documents = packed.shape[0]
        # layouts with whole words of one byte (8, 4, 2 bits) decode without widening (same codes as the general
        # path; for 4 bits, two masks and a stack measured faster than a broadcast shift); three-byte words (3 and
        # 6 bits) fit in int32
        if self.bits == 8:
            return packed
        if self.bits == 4:
            return torch.stack((packed & 0x0F, packed >> 4), dim=-1).view(documents, -1)
        mask = 2**self.bits - 1
        if self.bytes_per_word == 1:
            shifts = torch.arange(0, 8, self.bits, dtype=torch.uint8)
            return ((packed.unsqueeze(-1) >> shifts) & mask).view(documents, -1)
        word_dtype = torch.int32 if self.bytes_per_word < 4 else torch.int64
        byte_shifts = torch.arange(self.bytes_per_word, dtype=word_dtype) * 8
        words = (packed.view(documents, -1, self.bytes_per_word).to(word_dtype) << byte_shifts).sum(
            dim=-1, dtype=word_dtype
        )
        shifts = torch.arange(self.values_per_word, dtype=word_dtype) * self.bits
        return ((words.unsqueeze(-1) >> shifts) & mask).view(documents, -1)


def gradient_format(name: str, quantization: Mapping[str, Any] | None = None) -> GradientFormat:
    """The format called `name` (one of [`BANK_DTYPES`]).

    Args:
        name (`str`): the format name.
        quantization (`Mapping`, *optional*): a quantised format's parameters as `bank_config.json` records them
            (`bits`, `group_size`); defaults to this version's parameters for `name`.

    Returns:
        [`GradientFormat`]
    """
    if name in FLOAT_DTYPES:
        return FloatFormat(name)
    if name not in QUANTIZED_FORMATS:
        raise ReGradValueError(
            f"bank dtype must be one of {list(BANK_DTYPES)}, got {name!r} (bfloat16 is the default; int8, int4, int3 "
            "and int2 store integer codes with per-group scales)"
        )
    bits, group_size = QUANTIZED_FORMATS[name]
    if quantization is not None:
        bits, group_size = quantization.get("bits"), quantization.get("group_size")
    return QuantizedFormat(name, bits, group_size)


def _round_up_to_bfloat16(values: torch.Tensor) -> torch.Tensor:
    """Positive float32 values -> the smallest bf16 values not below them."""
    rounded = values.to(torch.bfloat16)
    below = rounded.float() < values
    bits = rounded.view(torch.int16)
    # for positive floats, the next representable value up is the next bit pattern
    return torch.where(below, bits + 1, bits).view(torch.bfloat16)


def _itemsize(safetensors_dtype: str) -> int:
    return {"BF16": 2, "F16": 2, "F32": 4, "U8": 1}[safetensors_dtype]

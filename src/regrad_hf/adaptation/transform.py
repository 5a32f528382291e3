"""A learned linear transform of the retrieved gradient, per LoRA tensor: `G' = L G R` (issue 29, lever 2).

For a LoRA tensor of shape `(m, n)` (`lora_A`: `(rank, in)`, `lora_B`: `(out, rank)`), `L` is `m x m` and `R` is
`n x n`. One side of each tensor is the LoRA rank (16 on the shipped layout), where a full matrix is cheap: `rank^2`
values. The other is a feature dimension (576 or 1536 on SmolLM2), where a full matrix would hold up to 2.4 M values
per tensor, more than all the LoRA tensors together; it gets a diagonal plus a rank-`k` term instead, `diag(d) + U V^T`
(`size * (1 + 2k)` values, `k` = `ReGradConfig.gradient_transform_rank`, at most the side's size). The rule, by shape
alone: a side no larger than the other is full, the larger one is diagonal plus low rank (a square tensor: both full).

It starts at the identity: full matrices are `I`, diagonals 1, and of each low-rank pair the factor that writes the
result (`U` of `L`, `V` of `R`: `L G = d * G + U (V^T G)`, `G R = G * d + (G U) V^T`) is 0 while the one that reads the
gradient is random (a fixed seed, so every process builds the same transform; with both at 0 neither would ever get a
gradient). At the identity the transformed gradient equals the gradient (only exact zeros are added, so at most the
sign of a zero changes), so a learner with a fresh transform steps exactly as a learner without one.

It is linear, so it applies to the summed gradient of the retrieved documents (`T(sum_i g_i) = sum_i T(g_i)`): one
transform per step, not one per document. Banks store raw gradients and the transform is applied after `gather` and
the sum (see [`GradientTransform`] for why).

Cost, shipped layout (rank 16, 90 tensors whose feature sides add up to 95,040): `23,040 + 95,040 * (1 + 2k)` values
(k = 1: 0.31 M, k = 4: 0.88 M, against 1.52 M LoRA values) and about `16 * 95,040 * (17 + 2k)` multiply-adds per step
(~38 M at k = 4): `deltas.combine` of 3 documents took 28-30 ms instead of 13.6 ms at k = 0 to 4 (one thread, a
shared 2-core CPU), mostly per-tensor overhead; generating 32 tokens takes seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import ReGradValueError

# The seed of the random reading factors: fixed, so that a fresh transform is the same in every process and run.
_INIT_SEED = 0


class GradientTransform(nn.Module):
    """`G' = L G R` for the gradient `G` of each LoRA tensor, all factors in one flat float32 parameter `raw` (saved
    as `regrad.gradient_transform` beside the step sizes), applied before the step sizes: the step of tensor `t` is
    `-gamma * alpha_t * L_t (sum_i g_{i,t}) R_t`.

    Why banks store raw gradients (applied at gather time, not pre-applied when a bank is built): a document's
    gradient depends on the base and theta only, and the transform, like the step sizes, is a use-time choice that
    training moves (the cached-gradient phase trains it against fixed gradients). With raw gradients a bank stays
    valid while the transform is trained or swapped, its identity check ([`learner_identity`]) leaves the transform
    out as it leaves the step sizes out, quantisation errors stay those of today's gradients, and the transform runs
    once on the summed k retrieved gradients rather than once per stored document.

    Args:
        shapes (`Mapping[str, Sequence[int]]`): the LoRA tensors' shapes by name (2-D), in a fixed order.
        rank (`int`): `k`, the rank of the low-rank term of the larger side (0: diagonal only).
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], rank: int):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ReGradValueError(f"the gradient transform's rank must be an integer >= 0, got {rank!r}")
        self.rank = rank
        # Each factor is the slice [start, start + numel) of `raw`, viewed in its shape.
        self._factors: dict[str, dict[str, tuple[int, tuple[int, ...]]]] = {}
        generator = torch.Generator().manual_seed(_INIT_SEED)
        parts: list[torch.Tensor] = []
        count = 0
        for name, shape in shapes.items():
            if len(shape) != 2:
                raise ReGradValueError(f"a gradient transform needs 2-D tensors, {name} has shape {tuple(shape)}")
            factors = {}
            for side, size, other in (("left", shape[0], shape[1]), ("right", shape[1], shape[0])):
                for key, value in _initial_factors(side, size, other, rank, generator).items():
                    factors[key] = (count, tuple(value.shape))
                    count += value.numel()
                    parts.append(value.reshape(-1))
            self._factors[name] = factors
        self.raw = nn.Parameter(torch.cat(parts))

    def factors(self, name: str) -> dict[str, torch.Tensor]:
        """The factors of one tensor's transform, as views of `raw` (differentiable): `left` (full `L`) or
        `left_diagonal`, `left_u`, `left_v` (`L = diag + u v^T`); `right` or `right_diagonal`, `right_u`, `right_v`
        (`R = diag + u v^T`)."""
        return {
            key: self.raw[start : start + math.prod(shape)].view(shape)
            for key, (start, shape) in self._factors[name].items()
        }

    def apply(self, name: str, gradient: torch.Tensor) -> torch.Tensor:
        """`L G R` of one tensor's gradient `G` (`(m, n)`), in the gradient's dtype; differentiable w.r.t. both the
        gradient and `raw` (call it under `torch.no_grad()` for a step that is not trained)."""
        factors = {key: value.to(gradient.dtype) for key, value in self.factors(name).items()}
        if "left" in factors:
            result = factors["left"] @ gradient
        else:
            result = factors["left_diagonal"][:, None] * gradient
            if self.rank:
                result = result + factors["left_u"] @ (factors["left_v"].T @ gradient)
        if "right" in factors:
            return result @ factors["right"]
        transformed = result * factors["right_diagonal"]
        if self.rank:
            transformed = transformed + (result @ factors["right_u"]) @ factors["right_v"].T
        return transformed


def _initial_factors(side: str, size: int, other: int, rank: int, generator: torch.Generator) -> dict:
    """The identity's factors of one side of a tensor's transform (see the module docstring)."""
    if size <= other:
        return {side: torch.eye(size)}
    k = min(rank, size)
    reading = torch.randn((size, k), generator=generator) / math.sqrt(size)
    writing = torch.zeros((size, k))
    u, v = (writing, reading) if side == "left" else (reading, writing)
    return {f"{side}_diagonal": torch.ones(size), f"{side}_u": u, f"{side}_v": v}


@torch.no_grad()
def transformed_rows(totals: torch.Tensor, name: str, transform: GradientTransform | None) -> torch.Tensor:
    """`transform` of tensor `name` applied to each row of `totals` (`(rows, *shape)` summed gradients), one row at a
    time so that a row's result does not depend on how many rows are transformed with it (the swap path and per-row
    serving then agree bit for bit); `totals` itself when there is no transform."""
    if transform is None:
        return totals
    return torch.stack([transform.apply(name, row) for row in totals])

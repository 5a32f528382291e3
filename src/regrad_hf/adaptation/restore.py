"""Applying a step to the LoRA tensors in place and putting the old values back bit for bit, also on error."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from ..errors import ReGradKeyError, ReGradValueError


def _check_delta(parameters: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> None:
    unknown = sorted(set(delta) - set(parameters))
    if unknown:
        raise ReGradKeyError(f"delta has tensors the model does not have: {unknown[:3]}")
    for name, value in delta.items():
        if tuple(value.shape) != tuple(parameters[name].shape):
            raise ReGradValueError(
                f"delta for {name} has shape {tuple(value.shape)}, the parameter has {tuple(parameters[name].shape)}"
            )


class ExactRestore:
    """Adds deltas to a fixed set of tensors in place and puts the saved values back, bit for bit, afterwards.

    Adding `-delta` would not round-trip in floating point, so the values are saved; the backup buffers are allocated
    once and reused (one set per level of nesting), and saving, adding and restoring are fused `torch._foreach_*`
    calls over all tensors, so an apply/undo cycle allocates nothing but the step itself.

    While a delta is applied, [`unadapted_values`] and [`unadapted`] give the values from before the outermost one.
    Nothing here is locked: a caller shared by several threads serialises the calls.

    Args:
        parameters (`Mapping[str, torch.Tensor]`): the tensors deltas are applied to, by name.
    """

    def __init__(self, parameters: Mapping[str, torch.Tensor]):
        self.parameters = dict(parameters)
        self._spare_backups: list[dict[str, torch.Tensor]] = []
        # The applied levels, outermost first: the names each one changed, and the buffers holding their old values.
        self._active: list[tuple[list[str], dict[str, torch.Tensor]]] = []

    @property
    def active(self) -> bool:
        """Whether a delta is applied now."""
        return bool(self._active)

    def unadapted_values(self) -> dict[str, torch.Tensor]:
        """Copies of the tensors as they were before the outermost applied delta (their current values when none is
        applied), detached."""
        values: dict[str, torch.Tensor] = {}
        for names, backup in self._active:
            for name in names:
                values.setdefault(name, backup[name])
        return {name: values.get(name, tensor).detach().clone() for name, tensor in self.parameters.items()}

    @contextmanager
    def unadapted(self) -> Iterator[None]:
        """Puts the values from before the outermost applied delta back for the duration of the block, then the
        adapted ones again, bit for bit (also when the block raises). A no-op when no delta is applied."""
        if not self._active:
            yield
            return
        original = self.unadapted_values()
        names = [name for name in original if any(name in level for level, _ in self._active)]
        targets = [self.parameters[name].detach() for name in names]  # see `applied` on why detached
        adapted = [target.clone() for target in targets]
        torch._foreach_copy_(targets, [original[name] for name in names])
        try:
            yield
        finally:
            torch._foreach_copy_(targets, adapted)

    @contextmanager
    def applied(self, delta: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Adds `delta` for the duration of the block; restores in `finally`, so an exception inside the block, or
        while applying, leaves the tensors exactly as they were. Nothing is written when `delta` does not fit."""
        _check_delta(self.parameters, delta)
        names = list(delta)
        if not names:  # the foreach ops refuse empty lists
            yield
            return
        # Written through detached views (the same storage) rather than under `torch.no_grad()`: a Ctrl-C landing
        # between a `no_grad` block's entry and its protected region would leave autograd off for the caller.
        targets = [self.parameters[name].detach() for name in names]
        backup = self._spare_backups.pop() if self._spare_backups else {}
        for name, target in zip(names, targets, strict=True):
            kept = backup.get(name)
            # Reallocated when the model was moved or cast since (`.to()` swaps the tensors' storage).
            if kept is None or (kept.shape, kept.dtype, kept.device) != (target.shape, target.dtype, target.device):
                backup[name] = torch.empty_like(target)
        saved = [backup[name] for name in names]
        level = (names, backup)
        try:
            torch._foreach_copy_(saved, targets)
            try:  # the level is pushed inside the try, so that no interrupt between the two leaves it behind
                self._active.append(level)
                steps = [delta[name].to(device=t.device, dtype=t.dtype) for name, t in zip(names, targets, strict=True)]
                torch._foreach_add_(targets, steps)
                yield
            finally:
                torch._foreach_copy_(targets, saved)
                if self._active and self._active[-1] is level:
                    self._active.pop()
        finally:
            self._spare_backups.append(backup)


@contextmanager
def applied_delta(parameters: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Adds `delta` to `parameters` in place for the duration of the block, then restores them bit for bit.

    A one-off [`ExactRestore`]; keep an `ExactRestore` to reuse its buffers across calls.
    """
    with ExactRestore(parameters).applied(delta):
        yield

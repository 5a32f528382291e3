"""Applying a step to the LoRA tensors in place and putting the old values back bit for bit, also on error, and also
when an interrupt cuts that clean-up short."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import GeneratorType

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


class _Level:
    """One block's write into the tensors: the names it wrote, their old values, and the generator running the block.

    The generator is what tells a level an interrupt left behind: it is closed once its block has ended, whatever
    line of the block's clean-up the interrupt cut (Python closes it; no line of ours has to run for that). It is held
    weakly: a block whose `__exit__` an interrupt kept from running is closed (so restored) when it is dropped."""

    __slots__ = ("backup", "block", "names")

    def __init__(self, names: list[str]):
        self.names = names
        self.backup: dict[str, torch.Tensor] = {}
        self.block: Callable[[], GeneratorType | None] = lambda: None

    def is_stale(self) -> bool:
        block = self.block()
        return block is None or inspect.getgeneratorstate(block) == inspect.GEN_CLOSED


class ExactRestore:
    """Adds deltas to a fixed set of tensors in place and puts the saved values back, bit for bit, afterwards.

    Adding `-delta` would not round-trip in floating point, so the values are saved; the backup buffers are allocated
    once and reused (one set per level of nesting), and saving, adding and restoring are fused `torch._foreach_*`
    calls over all tensors, so an apply/undo cycle allocates nothing but the step itself.

    While a delta is applied, [`unadapted_values`] and [`unadapted`] give the values from before the outermost one.
    Nothing here is locked: a caller shared by several threads serialises the calls.

    Interrupts: restoring is idempotent and re-entrant. A level stays recorded, with its saved values, until they are
    back, so a `KeyboardInterrupt` that cuts a block's clean-up leaves a level whose block has ended: [`repair`], which
    every method here runs first, puts its values back. A caller whose code reads the tensors without these methods
    (a forward) runs [`repair`] when [`needs_repair`] says so.

    Args:
        parameters (`Mapping[str, torch.Tensor]`): the tensors deltas are applied to, by name.
    """

    def __init__(self, parameters: Mapping[str, torch.Tensor]):
        self.parameters = dict(parameters)
        self._spare_backups: list[dict[str, torch.Tensor]] = []
        self._active: list[_Level] = []  # the levels written and not yet restored, outermost first

    @property
    def active(self) -> bool:
        """Whether a delta is applied now."""
        self.repair()
        return bool(self._active)

    def needs_repair(self) -> bool:
        """Whether an interrupt left a level whose block has ended (cheap; takes no lock)."""
        top = self._active[-1:]  # one read: another thread may pop meanwhile
        return bool(top) and top[0].is_stale()

    def repair(self) -> None:
        """Puts back the values of the levels whose block has ended without restoring them (an interrupt cut its
        clean-up), innermost first. Blocks nest, so such levels are the innermost ones. Cut itself, it is finished by
        the next call."""
        while self.needs_repair():
            self._restore_innermost()

    def unadapted_values(self) -> dict[str, torch.Tensor]:
        """Copies of the tensors as they were before the outermost applied delta (their current values when none is
        applied), detached."""
        self.repair()
        values: dict[str, torch.Tensor] = {}
        for level in self._active:
            for name in level.names:
                values.setdefault(name, level.backup[name])
        return {name: values.get(name, tensor).detach().clone() for name, tensor in self.parameters.items()}

    def unadapted(self) -> AbstractContextManager[None]:
        """Puts the values from before the outermost applied delta back for the duration of the block, then the
        adapted ones again, bit for bit (also when the block raises). A no-op when no delta is applied."""
        self.repair()
        if not self._active:
            return nullcontext()
        original = self.unadapted_values()
        names = [name for name in original if any(name in level.names for level in self._active)]
        return self._block(names, lambda targets: torch._foreach_copy_(targets, [original[n] for n in names]))

    def applied(self, delta: Mapping[str, torch.Tensor]) -> AbstractContextManager[None]:
        """Adds `delta` for the duration of the block; restores in `finally`, so an exception inside the block, or
        while applying, leaves the tensors exactly as they were. Nothing is written when `delta` does not fit."""
        _check_delta(self.parameters, delta)
        names = list(delta)

        def add(targets: list[torch.Tensor]) -> None:
            steps = [delta[name].to(device=t.device, dtype=t.dtype) for name, t in zip(names, targets, strict=True)]
            torch._foreach_add_(targets, steps)

        return self._block(names, add)

    def _block(self, names: list[str], write: Callable[[list[torch.Tensor]], None]) -> AbstractContextManager[None]:
        level = _Level(names)
        manager = self._written(level, write)
        level.block = weakref.ref(manager.gen)  # before the block starts: every recorded level knows its generator
        return manager

    @contextmanager
    def _written(self, level: _Level, write: Callable[[list[torch.Tensor]], None]) -> Iterator[None]:
        self.repair()
        if not level.names:  # the foreach ops refuse empty lists
            yield
            return
        # Written through detached views (the same storage) rather than under `torch.no_grad()`: a Ctrl-C landing
        # between a `no_grad` block's entry and its protected region would leave autograd off for the caller.
        targets = [self.parameters[name].detach() for name in level.names]
        backup = self._spare_backups.pop() if self._spare_backups else {}
        for name, target in zip(level.names, targets, strict=True):
            kept = backup.get(name)
            # Reallocated when the model was moved or cast since (`.to()` swaps the tensors' storage).
            if kept is None or (kept.shape, kept.dtype, kept.device) != (target.shape, target.dtype, target.device):
                backup[name] = torch.empty_like(target)
        torch._foreach_copy_([backup[name] for name in level.names], targets)
        level.backup = backup
        try:  # recorded inside the try, and only once its values are saved: a recorded level can always be restored
            self._active.append(level)
            write(targets)
            yield
        finally:
            while level in self._active:  # this level, and any inner one whose clean-up an interrupt cut
                self._restore_innermost()

    def _restore_innermost(self) -> None:
        """Puts the innermost level's saved values back, then forgets it (in that order: cut between the two, the
        copy is made again, to the same values)."""
        level = self._active[-1]
        targets = [self.parameters[name].detach() for name in level.names]
        torch._foreach_copy_(targets, [level.backup[name] for name in level.names])
        self._active.pop()
        self._spare_backups.append(level.backup)


@contextmanager
def applied_delta(parameters: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Adds `delta` to `parameters` in place for the duration of the block, then restores them bit for bit.

    A one-off [`ExactRestore`]; keep an `ExactRestore` to reuse its buffers across calls.
    """
    with ExactRestore(parameters).applied(delta):
        yield

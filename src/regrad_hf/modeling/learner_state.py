"""Reading and writing a learner's tensors (LoRA tensors, step sizes, and the gradient transform when the config asks
for one) on a [`ReGradForCausalLM`]: state dicts, `learner.safetensors` files, and a temporary swap to another
learner, all under the model's lock and checked before anything is written."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from ..adaptation.learner import StepSizes
from ..adaptation.transform import GradientTransform
from ..config import MAX_STEP_SIZE, ReGradConfig
from ..errors import ReGradError, ReGradValueError
from .learner_files import LEARNER_FILE, read_config, read_tensors

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

STEP_SIZES_KEY = "regrad.step_sizes"
TRANSFORM_KEY = "regrad.gradient_transform"


def learner_modules(
    config: ReGradConfig, lora: Mapping[str, torch.Tensor]
) -> tuple[StepSizes, GradientTransform | None]:
    """A fresh learner's step sizes (at `config.init_step_size`) and gradient transform (at the identity; `None` when
    `config.gradient_transform_rank` is `None`) for these LoRA tensors, on their device."""
    shapes = {name: tuple(p.shape) for name, p in lora.items()}
    device = next(iter(lora.values())).device
    step_sizes = StepSizes(shapes, config.step_size_mode, config.step_size_parametrization, config.init_step_size)
    rank = config.gradient_transform_rank
    transform = None if rank is None else GradientTransform(shapes, rank).to(device)
    return step_sizes.to(device), transform


def init_from_learner(model, folder: str | os.PathLike) -> None:
    """Starts `model` from a saved learner's LoRA tensors and step sizes, converting the step sizes when the two
    configs lay them out differently (e.g. the shipped learner's per-tensor ones into `step_size_mode="row"`), and
    its gradient transform; a learner without one leaves the model's new transform at the identity.

    Args:
        model ([`ReGradForCausalLM`]): the model to start (its own config decides the layout).
        folder (`str` or `os.PathLike`): a saved learner or compact checkpoint (`config.json`, `learner.safetensors`).

    Raises:
        [`ReGradValueError`]: a damaged file, or step sizes that do not match the folder's config.
    """
    folder = Path(folder)
    state = read_tensors(folder / LEARNER_FILE)  # a damaged file raises ReGradValueError, not SafetensorError
    source_config = read_config(folder / "config.json")
    shapes = {name: tuple(p.shape) for name, p in model.lora_parameters().items()}
    source = StepSizes(shapes, source_config.step_size_mode, source_config.step_size_parametrization, 1.0)
    if tuple(state[STEP_SIZES_KEY].shape) != tuple(source.raw.shape):
        raise ReGradValueError(f"{folder}: its step sizes do not match its config's step_size_mode")
    source.raw.data.copy_(state[STEP_SIZES_KEY])
    model.step_sizes.copy_from(source)
    state[STEP_SIZES_KEY] = model.step_sizes.raw.detach().clone()
    if model.gradient_transform is not None and TRANSFORM_KEY not in state:
        state[TRANSFORM_KEY] = model.gradient_transform.raw.detach().clone()
    model.load_learner_state(state, source=str(folder))


class LearnerStateMixin:
    """The learner-state methods of [`ReGradForCausalLM`] (it provides `_lora`, `step_sizes`, `gradient_transform`,
    `_restore` and `_adaptation_lock`)."""

    def learner_state_dict(self) -> dict[str, torch.Tensor]:
        """The learner's tensors: the LoRA tensors by name, the raw step sizes under `regrad.step_sizes`, and the
        gradient transform's factors, when it has one, under `regrad.gradient_transform`.

        Copies of the un-adapted values (also inside an adaptation, and whatever other threads do; see the class
        docstring), detached.
        """
        with self._adaptation_lock:
            state = self._restore.unadapted_values()
            state[STEP_SIZES_KEY] = self.step_sizes.raw.detach().clone()
            if self.gradient_transform is not None:
                state[TRANSFORM_KEY] = self.gradient_transform.raw.detach().clone()
        return state

    def _learner_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {name: tuple(p.shape) for name, p in self._lora.items()}
        shapes[STEP_SIZES_KEY] = tuple(self.step_sizes.raw.shape)
        if self.gradient_transform is not None:
            shapes[TRANSFORM_KEY] = tuple(self.gradient_transform.raw.shape)
        return shapes

    def _check_layout(self, found: Mapping[str, tuple[int, ...]], source: str) -> None:
        expected = self._learner_shapes()
        if dict(found) != expected:
            missing = sorted(set(expected) - set(found))[:3]
            unexpected = sorted(set(found) - set(expected))[:3]
            mismatched = sorted(n for n in set(found) & set(expected) if found[n] != expected[n])[:3]
            raise ReGradValueError(
                f"{source} does not fit this model's learner (missing {missing}, unexpected {unexpected}, "
                f"shape mismatch {mismatched}); was it saved with another config or base model?"
            )

    def load_learner_state(self, state: Mapping[str, torch.Tensor], source: str = "the state dict") -> None:
        """Copies a learner state (as from [`learner_state_dict`]) into the model.

        Names and shapes must match, every tensor must be floating point and finite, and so must the step sizes it
        gives. Nothing is written when a check fails.

        Raises:
            [`ReGradValueError`]: the state does not fit or holds non-finite values.
            [`ReGradError`]: called inside an adaptation (`knowledge`, `retrieved`, `injected`), whose restore would
                overwrite it.
        """
        if not isinstance(state, Mapping) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ReGradValueError(f"{source} must map tensor names to tensors")
        self._check_layout({name: tuple(t.shape) for name, t in state.items()}, source)
        for name, tensor in state.items():
            if not tensor.dtype.is_floating_point:
                raise ReGradValueError(f"{source}: {name} is {tensor.dtype}, a learner's tensors are floating point")
            if not bool(torch.isfinite(tensor).all()):
                raise ReGradValueError(f"{source}: {name} holds NaN or infinite values; the learner is damaged")
        raw = state[STEP_SIZES_KEY].detach().float()
        values = raw.exp() if self.step_sizes.parametrization == "log" else raw
        if not bool(torch.isfinite(values).all()):
            raise ReGradValueError(f"{source}: the step sizes {values.tolist()[:3]} are not finite")
        if bool((values.abs() > MAX_STEP_SIZE).any()):  # the bound a config's init_step_size has
            raise ReGradValueError(
                f"{source}: a step size of {values.abs().max().item():.3g} is beyond {MAX_STEP_SIZE:g}; the learner "
                "is damaged"
            )
        with self._adaptation_lock, torch.no_grad():
            self._refuse_inside_adaptation()
            for name, parameter in self._lora.items():
                parameter.copy_(state[name])
            self.step_sizes.raw.copy_(state[STEP_SIZES_KEY])
            if self.gradient_transform is not None:
                self.gradient_transform.raw.copy_(state[TRANSFORM_KEY])

    def _refuse_inside_adaptation(self) -> None:
        if self._restore.active:  # only the thread holding the lock can be inside one
            raise ReGradError(
                "cannot load a learner state inside knowledge()/retrieved()/injected(): leaving the block would "
                "restore the adapted tensors over it; load it before or after"
            )

    def load_learner(self, path: str | os.PathLike) -> None:
        """Loads LoRA tensors, step sizes and gradient transform from a `learner.safetensors` file.

        Names and shapes are checked from the file's header before any tensor is read; then the checks of
        [`load_learner_state`].

        Raises:
            [`ReGradValueError`]: the file does not fit this model, holds non-finite values, or is not a readable
                safetensors file (truncated, damaged).
        """
        source = str(path)
        try:
            with safe_open(source, framework="pt") as file:
                names = file.keys()  # a safe_open handle is not iterable
                found = {name: tuple(file.get_slice(name).get_shape()) for name in names}
                self._check_layout(found, source)
                state = {name: file.get_tensor(name) for name in found}
        except ReGradError:
            raise
        except (SafetensorError, OSError, RuntimeError, ValueError) as error:
            raise ReGradValueError(
                f"{source} is not a readable learner file ({type(error).__name__}: {error}); save or download it again"
            ) from error
        self.load_learner_state(state, source=source)

    @contextmanager
    def swapped_learner(self, state: Mapping[str, torch.Tensor]) -> Iterator[Self]:
        """Uses another learner state (e.g. the untrained start) inside the block; restores this one bit for bit."""
        with self._adaptation_lock:
            self._refuse_inside_adaptation()
            saved = self.learner_state_dict()
            try:
                self.load_learner_state(state)
                yield self
            finally:
                self.load_learner_state(saved)

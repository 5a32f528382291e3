"""Per-example gradients of linear-layer weights from one batched forward and backward pass.

For a linear layer `y = x W^T` applied to a batch, the gradient of a loss that is a sum of independent per-row
losses w.r.t. `W` splits into one term per row: `dL_b/dW = sum_t dy[b, t]^T x[b, t]`. Capturing each layer's
input `x` in the forward pass and the gradient `dy` of its output in the backward pass gives every row's gradient
with one einsum per layer, at the FLOP cost of the summed gradient: no per-row backward passes, no `vmap` over
the model (which many transformers models do not support).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch
from torch import nn

from .. import scopes
from ..errors import ReGradError, ReGradTypeError


class LinearWeightGradients:
    """Collects per-row gradients of the `weight` of chosen `nn.Linear` modules for one forward/backward.

    Only forwards run by the thread that entered the block are recorded, so other threads may use the modules
    meanwhile (their forwards are neither captured nor changed).

    Args:
        modules (`Mapping[str, nn.Linear]`): the linear modules, by the name their weight's gradient is wanted under.

    Example:
        ```python
        capture = LinearWeightGradients({"lora_A": layer.lora_A["default"]})
        with capture:
            loss = per_row_losses(model(batch)).sum()
        per_row = capture.gradients(loss)  # {"lora_A": (batch, *weight.shape)}
        ```
    """

    def __init__(self, modules: Mapping[str, nn.Linear]):
        for name, module in modules.items():
            if not isinstance(module, nn.Linear):
                raise ReGradTypeError(f"{name} is a {type(module).__name__}, not an nn.Linear")
        self.modules = dict(modules)
        self._calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in self.modules}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._thread: int | None = None
        self._active = False
        self._owner = None

    def __enter__(self) -> LinearWeightGradients:
        # The modules may be shared with other threads (a model serving generate calls): only the forwards of the
        # thread that entered the block are this capture's.
        self._thread = threading.get_ident()
        self._owner = scopes.owner_frame()  # the block's frame: once it is gone, so is the capture (see `_recorder`)
        for module in self.modules.values():  # a capture of this thread whose block an interrupt cut: repaired
            remove_stale_captures(module)
        self._active = True
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._recorder(name)))
        except BaseException:  # a KeyboardInterrupt between two registrations: no hook stays behind
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        # Idempotent and re-entrant: a second interrupt may cut it, and it may run again. Hooks are found on the
        # modules themselves, not only through the handles (a hook registered just before an interrupt has none);
        # one that stays behind anyway records nothing and removes itself at its next call (see `_recorder`).
        self._active = False
        for module in self.modules.values():
            _remove_hooks_of(module, self)
        self._handles.clear()
        self._owner = None

    def _recorder(self, name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if threading.get_ident() != self._thread:
                return
            if not self._active or not scopes.is_running(
                self._owner
            ):  # left behind by an interrupt: repair, record nothing
                _remove_hooks_of(module, self)
                return
            # A module called several times in one forward (shared weights) contributes once per call.
            self._calls[name].append((args[0], output))

        record.capture = self
        return record

    def gradients(self, loss: torch.Tensor, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """Per-row weight gradients of `loss`, which must be a sum of per-row losses over the batch.

        Args:
            loss (`torch.Tensor`): the summed loss.
            batch_size (`int`, *optional*): the number of rows. Needed when a layer sees its input flattened to
                `(batch * tokens, features)` (OPT's MLP); without it the first dimension of each input is the batch.

        Returns:
            `dict[str, torch.Tensor]`: `{name: (batch, out_features, in_features)}` in each weight's dtype.
        """
        names = [name for name, calls in self._calls.items() for _ in calls]
        calls = [call for name in self.modules for call in self._calls[name]]
        missing = [name for name, recorded in self._calls.items() if not recorded]
        if missing:
            raise ReGradError(f"modules {missing[:3]} were not called in the forward pass")
        output_gradients = torch.autograd.grad(loss, [output for _, output in calls], allow_unused=True)
        per_row: dict[str, torch.Tensor] = {}
        for name, (inputs, output), output_gradient in zip(names, calls, output_gradients, strict=True):
            weight = self.modules[name].weight
            if output_gradient is None:
                output_gradient = torch.zeros_like(output)
            # (batch, tokens, out) x (batch, tokens, in) -> (batch, out, in); inputs of any rank >= 2 are flattened
            # to (batch, tokens, features), batch first (as a row-major flattening of (batch, tokens) keeps it).
            rows = output.shape[0] if batch_size is None else batch_size
            row_gradient = torch.einsum(
                "bto,bti->boi",
                output_gradient.reshape(rows, -1, output.shape[-1]),
                inputs.detach().reshape(rows, -1, inputs.shape[-1]).to(output_gradient.dtype),
            ).to(weight.dtype)
            per_row[name] = per_row[name] + row_gradient if name in per_row else row_gradient
        self._calls = {name: [] for name in self.modules}
        return per_row


def _remove_hooks_of(module: nn.Module, capture: LinearWeightGradients) -> None:
    """Removes every forward hook of `capture` from `module`."""
    scopes.remove_forward_hooks(module, lambda hook: getattr(hook, "capture", None) is capture)


def remove_stale_captures(module: nn.Module) -> int:
    """Removes the hooks that captures left behind on `module`: those of the calling thread (which cannot be inside
    a capture while it calls this) or of a thread that has ended, e.g. after a `KeyboardInterrupt` landed before a
    block's clean-up could run. Captures of other running threads are theirs and kept. Returns how many it removed.
    """
    me, alive = threading.get_ident(), {thread.ident for thread in threading.enumerate()}
    stale = {
        hook.capture
        for hook in list(module._forward_hooks.values())
        if getattr(hook, "capture", None) is not None
        and (hook.capture._thread == me or hook.capture._thread not in alive)
    }
    for capture in stale:
        capture._active = False
        _remove_hooks_of(module, capture)
    return len(stale)

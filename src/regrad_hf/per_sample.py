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

from .errors import ReGradError, ReGradTypeError


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

    def __enter__(self) -> LinearWeightGradients:
        # The modules may be shared with other threads (a model serving generate calls): only the forwards of the
        # thread that entered the block are this capture's.
        self._thread = threading.get_ident()
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._recorder(name)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _recorder(self, name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if threading.get_ident() != self._thread:
                return
            # A module called several times in one forward (shared weights) contributes once per call.
            self._calls[name].append((args[0], output))

        return record

    def gradients(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row weight gradients of `loss`, which must be a sum of per-row losses over the batch.

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
            # to (batch, tokens, features).
            row_gradient = torch.einsum(
                "bto,bti->boi",
                output_gradient.reshape(output.shape[0], -1, output.shape[-1]),
                inputs.detach().reshape(inputs.shape[0], -1, inputs.shape[-1]).to(output_gradient.dtype),
            ).to(weight.dtype)
            per_row[name] = per_row[name] + row_gradient if name in per_row else row_gradient
        self._calls = {name: [] for name in self.modules}
        return per_row

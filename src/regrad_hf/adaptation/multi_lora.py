"""Per-row LoRA: every row of a batch runs with its own LoRA tensors, in one forward, the shared tensors untouched.

The swap path ([`restore.applied_delta`]) writes one step into the shared LoRA tensors, so a batch can carry one
delta. Multi-LoRA servers (S-LoRA, Punica) instead give each request its own adapter inside one batched forward.
Here, for the duration of a [`per_row_lora`] block, each LoRA projection (peft's `lora_A`/`lora_B` `nn.Linear`
modules) multiplies row `r` of its input by row `r` of a stacked factor: `lora_A` by `A'_r` of shape
`(batch, rank, in)`, `lora_B` by `B'_r` of shape `(batch, out, rank)` (one `torch.bmm` each). peft's LoRA layer
around them is unchanged, so it still adds `scaling * B'_r A'_r x_r` to the base layer's output, and the base layer
runs once for the whole batch. No tensor of the model is written.

The stacked factors come from [`retrieval_row_tensors`] (a generate call's rows: one gather of all the rows'
documents, each row's step computed from it directly) or from [`stacked_row_tensors`] (any deltas).

Why not peft's own mixed-adapter batches (`adapter_names=` in `forward`/`generate`): they select among *named*
adapters, so every call would first have to create one adapter per distinct row delta on every LoRA layer
(`update_layer` builds two `nn.Linear` per layer, whose constructor draws from the global RNG), copy the adapted
tensors in and delete them afterwards; and the adapter modules would be registered on the shared model, so
they would have to be guarded like the weight swap. Its forward also loops over the distinct adapters with a gather
and a scatter per adapter per layer and per decoding step, where the stacked factors take one `bmm`.
`benchmarks/bench_batched_generation.py` measures both.

The per-row outputs replace the outputs of the shared projections, which are still computed and thrown away: two
rank-`r` products per LoRA layer (about 4 % of the targeted layers' work at rank 16 on SmolLM2), the price of leaving
peft's forward untouched.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .. import scopes
from ..errors import ReGradError, ReGradKeyError, ReGradValueError
from . import deltas
from .learner import is_lora_parameter_name
from .transform import GradientTransform, transformed_rows


@torch.no_grad()
def stacked_row_tensors(
    parameters: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    rows: Sequence[int | None],
) -> dict[str, torch.Tensor]:
    """The LoRA tensors each row of a batch runs with, stacked: `{name: (len(rows), *shape)}`.

    Row `i` gets `parameters[name] + deltas[rows[i]][name]` (the delta cast to the parameter's dtype first, so the
    values equal what [`restore.applied_delta`] writes), or the parameter itself when `rows[i]` is `None` or the delta
    has no tensor of that name. Each distinct delta is added once; rows that share one share its values.

    Args:
        parameters (`Mapping[str, torch.Tensor]`): the LoRA tensors by name (read, never written).
        deltas (`Sequence[Mapping[str, torch.Tensor]]`): the distinct deltas, e.g. from [`deltas.combine`].
        rows (`Sequence[int | None]`): for each row, the index of its delta in `deltas`, or `None` for no delta.

    Returns:
        `dict[str, torch.Tensor]`: stacked adapted tensors, detached, in the parameters' dtype and device.
    """
    if not rows:
        raise ReGradValueError("rows is empty: give one entry per row of the batch")
    bad = [row for row in rows if row is not None and not 0 <= row < len(deltas)]
    if bad:
        raise ReGradValueError(f"rows {bad[:3]} name no delta: there are {len(deltas)} deltas (use None for no delta)")
    for delta in deltas:
        unknown = sorted(set(delta) - set(parameters))
        if unknown:
            raise ReGradKeyError(f"delta has tensors the model does not have: {unknown[:3]}")
        misshapen = sorted(name for name in delta if delta[name].shape != parameters[name].shape)
        if misshapen:
            raise ReGradValueError(f"delta tensors {misshapen[:3]} do not have their parameters' shapes")
    # Position 0 of each candidate stack is the unadapted tensor; delta u sits at position u + 1.
    index = torch.tensor([0 if row is None else row + 1 for row in rows])
    stacked = {}
    for name, parameter in parameters.items():
        base = parameter.detach()
        candidates = [base] + [
            base + delta[name].to(device=base.device, dtype=base.dtype) if name in delta else base for delta in deltas
        ]
        stacked[name] = torch.stack(candidates).index_select(0, index.to(base.device))
    return stacked


@torch.no_grad()
def retrieval_row_tensors(
    parameters: Mapping[str, torch.Tensor],
    gathered: Mapping[str, torch.Tensor],
    retrievals: Sequence[Sequence[int] | None],
    step_sizes: Mapping[str, torch.Tensor],
    gamma: float,
    transform: GradientTransform | None = None,
) -> dict[str, torch.Tensor]:
    """The LoRA tensors each row of a batch runs with, stacked, straight from the gradients of all the rows'
    documents (gathered once): `{name: (len(retrievals), *shape)}`.

    Row `i` gets `parameters[name] + (-gamma * step_sizes[name] * T(sum_j gathered[name][retrievals[i][j]]))` (summed
    in float32 in retrieval order by [`deltas.summed_rows`], `T` the gradient transform applied to each distinct
    retrieval's sum on its own, cast to the parameter's dtype before the addition), the same arithmetic as
    [`deltas.combine`] followed by the swap of [`restore.applied_delta`], so the values are bit for bit what the swap
    writes; `None` rows get the parameter itself. Each distinct retrieval is computed once, and all
    retrievals of one length together: one `index_select` and one add per document position, one scaling and one
    addition of the base per tensor.

    Args:
        parameters (`Mapping[str, torch.Tensor]`): the LoRA tensors by name (read, never written).
        gathered (`Mapping[str, torch.Tensor]`): `{name: (documents, *shape)}` gradients of the union of the rows'
            documents; a parameter without gradients stays unadapted.
        retrievals (`Sequence[Sequence[int] | None]`): per row, the positions of its documents in `gathered`, best
            first, or `None` for no retrieval.
        step_sizes (`Mapping[str, torch.Tensor]`): `alpha` by name: scalars, or tensors broadcastable to the shape.
        gamma (`float`): test-time multiplier.
        transform ([`GradientTransform`], *optional*): the learned gradient transform, or none.

    Returns:
        `dict[str, torch.Tensor]`: stacked adapted tensors, detached, in the parameters' dtype and device.
    """
    if not retrievals:
        raise ReGradValueError("retrievals is empty: give one entry per row of the batch")
    unknown = sorted(set(gathered) - set(parameters))
    if unknown:
        raise ReGradKeyError(f"gradients for tensors the model does not have: {unknown[:3]}")
    missing = sorted(set(gathered) - set(step_sizes))
    if missing:
        raise ReGradKeyError(f"no step size for gradient tensors {missing[:3]}")
    distinct = list(dict.fromkeys(tuple(r) for r in retrievals if r is not None))
    documents = next(iter(gathered.values())).shape[0] if gathered else 0
    if any(not r or not all(0 <= p < documents for p in r) for r in distinct):
        raise ReGradValueError(f"each retrieval must name one or more of the {documents} gathered documents")
    # Retrievals of one length are summed together; position u + 1 of the candidates is distinct retrieval u.
    by_length: dict[int, list[int]] = {}
    for number, retrieval in enumerate(distinct):
        by_length.setdefault(len(retrieval), []).append(number)
    rows = [0 if r is None else distinct.index(tuple(r)) + 1 for r in retrievals]
    one_to_one = rows == list(range(1, len(distinct) + 1))  # every row its own retrieval, in order: no reindexing
    stacked = {}
    for name, parameter in parameters.items():
        base = parameter.detach()
        if name not in gathered:
            stacked[name] = base.expand(len(rows), *base.shape).clone()
            continue
        gradients = gathered[name].to(base.device)
        totals = []
        for numbers in by_length.values():
            index = torch.tensor([distinct[n] for n in numbers], device=base.device)
            totals.append(deltas.summed_rows(gradients, index))
        total = totals[0] if len(totals) == 1 else torch.cat(totals)
        if len(totals) > 1:  # back to the order of `distinct`
            order = [n for numbers in by_length.values() for n in numbers]
            total = total.index_select(0, torch.tensor(order, device=base.device).argsort())
        total = transformed_rows(total, name, transform)
        adapted = deltas.scaled_steps(total, step_sizes[name], gamma).to(base.dtype).add_(base)
        if one_to_one:
            stacked[name] = adapted
        else:
            candidates = torch.cat((base.unsqueeze(0), adapted))
            stacked[name] = candidates.index_select(0, torch.tensor(rows, device=base.device))
    return stacked


def _projection_hook(weights: torch.Tensor, thread: int, owner):
    """A forward hook for a bias-free `nn.Linear` that applies row `r`'s weight to row `r` of the input, while the
    frame `owner` (the one running the [`per_row_lora`] block) runs; one that a `KeyboardInterrupt` left behind
    removes itself at its next call and changes nothing."""
    expanded = {weights.shape[0]: weights.transpose(1, 2)}  # (rows, in, out), keyed by the batch size it serves

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if threading.get_ident() != thread:
            return None  # another thread's forward through the shared model: leave it alone
        if not scopes.is_running(owner):  # its block is gone: repair, leave the forward as it is
            scopes.remove_forward_hooks(module, lambda registered: registered is hook)
            return None
        x = args[0]
        if x.dim() != 3:
            raise ReGradError(f"per-row LoRA expects inputs of shape (batch, tokens, features), got {tuple(x.shape)}")
        batch = x.shape[0]
        if batch not in expanded:
            rows = weights.shape[0]
            if batch % rows:
                raise ReGradError(
                    f"a batch of {rows} rows with per-row LoRA tensors reached a LoRA layer with {batch} rows; "
                    "generation may only repeat each row (num_beams, num_return_sequences)"
                )
            # generate expands a batch by repeating each row in place (repeat_interleave); follow it.
            expanded[batch] = expanded[rows].repeat_interleave(batch // rows, dim=0)
        return torch.bmm(x, expanded[batch])

    return hook


@contextmanager
def per_row_lora(model: nn.Module, row_tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Runs every row of the batches fed to `model` inside the block with its own LoRA tensors.

    `row_tensors` maps LoRA weight names (`...lora_A.<adapter>.weight`, `...lora_B.<adapter>.weight`, as in
    `model.named_parameters()`) to stacked per-row values (from [`stacked_row_tensors`]). Each forward inside the
    block must carry exactly that many rows, or a whole multiple of it where generation repeats each row in place
    (beam search, `num_return_sequences`). The hooks act only on forwards of the thread that entered the block, so
    other threads may use the model meanwhile; they are removed on exit, also when the block raises.

    Args:
        model (`nn.Module`): the model carrying the LoRA layers.
        row_tensors (`Mapping[str, torch.Tensor]`): `{weight name: (rows, out, in)}`.
    """
    thread, owner = threading.get_ident(), scopes.owner_frame()
    hooks = []
    try:
        for name, weights in row_tensors.items():
            module_name, _, attribute = name.rpartition(".")
            module = model.get_submodule(module_name)
            is_projection = isinstance(module, nn.Linear) and module.bias is None and attribute == "weight"
            if not (is_projection and is_lora_parameter_name(name)):
                raise ReGradValueError(f"{name} is not the weight of a bias-free nn.Linear (a LoRA projection)")
            if tuple(weights.shape[1:]) != tuple(module.weight.shape):
                raise ReGradValueError(
                    f"per-row tensors for {name} have shape {tuple(weights.shape)}, expected (rows, "
                    f"{', '.join(map(str, module.weight.shape))})"
                )
            hook = _projection_hook(weights, thread, owner)
            hooks.append((module, hook))  # before it is registered: the clean-up finds every hook it may have
            module.register_forward_hook(hook)
        yield
    finally:
        for module, hook in hooks:  # idempotent: a second interrupt may cut it; a hook left is inert (see above)
            scopes.remove_forward_hooks(module, lambda registered, hook=hook: registered is hook)

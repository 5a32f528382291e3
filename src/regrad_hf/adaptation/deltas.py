"""The math of ReGrad: document gradients and the combined step (applying it reversibly:
[`regrad_hf.adaptation.restore`]).

Nothing here knows about banks, files or generation: tensors in, tensors out.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from types import FrameType

import torch
from torch import nn

from .. import scopes
from ..errors import InferenceModeError, ReGradKeyError, ReGradTypeError, ReGradValueError
from ..log import warn_at_caller
from .per_sample import LinearWeightGradients
from .transform import GradientTransform, transformed_rows

GradientDict = dict[str, torch.Tensor]


def check_documents(documents: Sequence[str]) -> None:
    """Raises [`ReGradValueError`] unless `documents` is a non-empty sequence of non-blank strings.

    A sequence is anything with a length and integer indexing (a list, a tuple, a `datasets.Dataset` column); a
    mapping, a set, a generator or `None` raises [`ReGradTypeError`] (documents are sliced into batches, in order).
    """
    if isinstance(documents, str):
        raise ReGradValueError("documents must be a list of strings, not a single string")
    if (
        isinstance(documents, (bytes, bytearray, Mapping, AbstractSet))
        or not hasattr(documents, "__len__")
        or not hasattr(documents, "__getitem__")
    ):
        raise ReGradTypeError(f"documents must be a list of strings, got {type(documents).__name__}")
    if len(documents) == 0:
        raise ReGradValueError("documents is empty: give at least one document")
    for index, document in enumerate(documents):
        if not isinstance(document, str):
            raise ReGradValueError(f"document {index} is a {type(document).__name__}, not a string")
        if not document.strip():
            raise ReGradValueError(f"document {index} is empty")
        try:
            document.encode("utf-8")
        except UnicodeEncodeError as error:  # lone surrogates, e.g. from bytes decoded with errors="surrogateescape"
            raise ReGradValueError(f"document {index} is not valid Unicode text: {error}") from error


class _Truncations(threading.local):
    """The documents tokenized so far in the current thread's outermost [`truncation_report`] block, and the frame
    of that block's caller (see [`regrad_hf.scopes`]): a report whose block an interrupt cut before its `finally`
    ran is stale once that frame is gone, and is then replaced instead of swallowing every later warning."""

    report: dict | None = None
    owner: FrameType | None = None


_truncations = _Truncations()


@contextmanager
def truncation_report() -> Iterator[None]:
    """Collects the truncations of every document tokenized inside the block (in this thread) and reports them in one
    warning when the block ends, attributed to the caller's line: `"3 of 10 documents truncated to
    max_document_tokens=512 (the longest had 900 tokens)"`. Nested blocks report with the outermost one, so that a
    public call wrapped in one (`model.knowledge`, an evaluation; usable as a decorator) warns once however many
    batches it tokenizes; a document tokenized several times counts once. Nothing is reported when the block raises.
    """
    if _truncations.report is not None and scopes.is_running(_truncations.owner):
        yield
        return
    report = {"documents": set(), "truncated": set(), "longest": 0, "max_tokens": 0}
    _truncations.owner, _truncations.report = scopes.owner_frame(), report
    try:
        yield
    finally:
        if _truncations.report is report:
            _truncations.report = _truncations.owner = None
    if report["truncated"]:
        warn_at_caller(
            f"{len(report['truncated'])} of {len(report['documents'])} documents truncated to "
            f"max_document_tokens={report['max_tokens']} (the longest had {report['longest']} tokens)"
        )


def tokenize_document(tokenizer, document: str, max_tokens: int) -> list[int]:
    """Token ids of a document for its LM loss, truncated to `max_tokens` (reported by [`truncation_report`]).

    Raises:
        [`ReGradValueError`]: when fewer than 2 tokens remain (there is nothing to predict).
    """
    with truncation_report():
        ids = tokenizer(document, truncation=False)["input_ids"]
        report = _truncations.report
        key = hash(document)  # documents are counted once however often they are tokenized
        report["documents"].add(key)
        if len(ids) > max_tokens:
            report["truncated"].add(key)
            report["longest"] = max(report["longest"], len(ids))
            report["max_tokens"] = max_tokens
            ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ReGradValueError(f"document {document!r} has fewer than 2 tokens: there is nothing to predict")
    return ids


def tokenize_documents(tokenizer, documents: Sequence[str], max_tokens: int) -> list[list[int]]:
    """[`tokenize_document`] of each document, with one truncation warning for them all."""
    with truncation_report():
        return [tokenize_document(tokenizer, document, max_tokens) for document in documents]


@contextmanager
def differentiable(parameters: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Autograd on for the block, whatever the caller's mode: inference code wraps calls in `torch.no_grad()` or
    `torch.inference_mode()`, and a document gradient is an autograd computation of its own. Inside the block grad is
    enabled and inference mode is left, so that the forward records a graph; what the block returns are normal
    tensors, which the caller's code may use under its mode.

    Raises:
        [`InferenceModeError`]: some of `parameters` are inference tensors (the model was built or loaded inside
            `torch.inference_mode()`): autograd cannot differentiate them. Build the model outside it.
    """
    inference = [name for name, parameter in parameters.items() if parameter.is_inference()]
    if inference:
        raise InferenceModeError(
            f"cannot compute document gradients: {len(inference)} LoRA tensors (e.g. {inference[0]}) were created "
            "under torch.inference_mode(), and autograd cannot differentiate them; load or build the model outside "
            "torch.inference_mode() (calling with torch.no_grad() or torch.inference_mode() around is fine)"
        )
    with torch.inference_mode(False), torch.enable_grad():
        yield


def document_gradient(
    model: nn.Module,
    tokenizer,
    parameters: Mapping[str, torch.Tensor],
    document: str,
    max_tokens: int,
    create_graph: bool = False,
) -> GradientDict:
    """Gradient of a document's mean token negative log-likelihood w.r.t. `parameters` only.

    The base weights must not require grad; `parameters` (the LoRA tensors) must. `.grad` fields are left untouched
    (`torch.autograd.grad`), so this is safe to call in the middle of training.

    Args:
        model (`nn.Module`): the causal LM carrying the LoRA tensors.
        tokenizer: its tokenizer.
        parameters (`Mapping[str, torch.Tensor]`): the tensors to differentiate, by name.
        document (`str`): the text.
        max_tokens (`int`): longer documents are truncated, with a warning.
        create_graph (`bool`, defaults to `False`): keep the graph (second-order meta-learning).

    Returns:
        `dict[str, torch.Tensor]`: one gradient per parameter name, same shape and dtype as the parameter.
    """
    return _gradient_of_tokens(model, parameters, tokenize_document(tokenizer, document, max_tokens), create_graph)


def _gradient_of_tokens(
    model: nn.Module, parameters: Mapping[str, torch.Tensor], ids: Sequence[int], create_graph: bool = False
) -> GradientDict:
    with differentiable(parameters):
        input_ids = torch.tensor([ids], device=next(iter(parameters.values())).device)
        # The same loss the meta-learning inner step differentiates, so banks and training agree by construction.
        loss = documents_lm_loss(model, input_ids, torch.ones_like(input_ids))
        gradients = torch.autograd.grad(loss, list(parameters.values()), create_graph=create_graph, allow_unused=True)
    return {
        name: torch.zeros_like(parameter) if gradient is None else gradient
        for (name, parameter), gradient in zip(parameters.items(), gradients, strict=True)
    }


def document_gradients(
    model: nn.Module,
    tokenizer,
    parameters: Mapping[str, torch.Tensor],
    documents: Sequence[str],
    max_tokens: int,
    batch_size: int = 16,
    max_batch_tokens: int = 4096,
) -> GradientDict:
    """Per-document gradients of several documents, stacked: `{name: tensor of shape (len(documents), *shape)}`.

    Documents are sorted by length and run in right-padded batches of up to `batch_size` documents and
    `max_batch_tokens` padded tokens; each document's gradient is read off its own rows of the batch (see
    [`LinearWeightGradients`]), so the result equals [`document_gradient`] on each document alone up to float
    rounding. Parameters that are not the weight of an `nn.Linear` fall back to one document at a time. The model
    is put in eval mode (no dropout) for the computation and returned to its previous mode after. Autograd is on for
    the computation even under the caller's `torch.no_grad()` or `torch.inference_mode()` (see [`differentiable`]).

    Args:
        batch_size (`int`, defaults to 16): documents per forward/backward pass.
        max_batch_tokens (`int`, defaults to 4096): cap on `documents x longest document` per pass (memory).
    """
    check_documents(documents)
    if batch_size < 1 or max_batch_tokens < 1:
        raise ReGradValueError(
            f"batch_size and max_batch_tokens must be positive, got {batch_size}, {max_batch_tokens}"
        )
    token_ids = tokenize_documents(tokenizer, documents, max_tokens)
    weight_modules = _linear_modules_of(model, parameters)
    was_training = model.training
    model.eval()
    try:
        with differentiable(parameters):
            return _batched_gradients(parameters, token_ids, weight_modules, model, batch_size, max_batch_tokens)
    finally:
        model.train(was_training)


def _batched_gradients(
    parameters: Mapping[str, torch.Tensor],
    token_ids: list[list[int]],
    weight_modules: dict[str, nn.Linear] | None,
    model: nn.Module,
    batch_size: int,
    max_batch_tokens: int,
) -> GradientDict:
    """[`document_gradients`] of tokenized documents, under [`differentiable`]."""
    if weight_modules is None:
        per_document = [_gradient_of_tokens(model, parameters, ids) for ids in token_ids]
        return {name: torch.stack([gradients[name] for gradients in per_document]) for name in parameters}
    stacked = {
        name: torch.empty((len(token_ids), *p.shape), dtype=p.dtype, device=p.device) for name, p in parameters.items()
    }
    device = next(iter(parameters.values())).device
    for rows in _length_buckets([len(ids) for ids in token_ids], batch_size, max_batch_tokens):
        input_ids, attention_mask = _right_padded([token_ids[row] for row in rows], device)
        with LinearWeightGradients(weight_modules) as capture:
            loss = documents_lm_loss(model, input_ids, attention_mask)
        for name, gradients in capture.gradients(loss, len(rows)).items():
            stacked[name][rows] = gradients
    return stacked


def _linear_modules_of(model: nn.Module, parameters: Mapping[str, torch.Tensor]) -> dict[str, nn.Linear] | None:
    """`{parameter name: the nn.Linear whose weight it is}`, or `None` when some parameter is not such a weight."""
    modules = {}
    for name, parameter in parameters.items():
        module_name, _, attribute = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return None
        if attribute != "weight" or not isinstance(module, nn.Linear) or module.weight is not parameter:
            return None
        modules[name] = module
    return modules


def _length_buckets(
    lengths: Sequence[int], batch_size: int, max_batch_tokens: int, max_padding: float = 0.1
) -> list[list[int]]:
    """Groups indices by decreasing length into batches whose padding stays under `max_padding` of their tokens.

    On CPU a longer batch hardly raises matmul efficiency, so padded tokens are mostly wasted work; in a large build
    neighbours in length order differ by a token or two and batches fill up anyway.
    """
    buckets: list[list[int]] = []
    real_tokens = 0
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if buckets:
            # The first index of a bucket is its longest, so the padded size is len(bucket) * that length.
            padded = (len(buckets[-1]) + 1) * lengths[buckets[-1][0]]
            fits = len(buckets[-1]) < batch_size and padded <= max_batch_tokens
            if fits and padded <= (1 + max_padding) * (real_tokens + lengths[index]):
                buckets[-1].append(index)
                real_tokens += lengths[index]
                continue
        buckets.append([index])
        real_tokens = lengths[index]
    return buckets


def _right_padded(token_ids: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `(input_ids, attention_mask)`; the pad value is irrelevant as padded positions are masked."""
    longest = max(len(ids) for ids in token_ids)
    input_ids = torch.zeros((len(token_ids), longest), dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, device=device)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def documents_lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sum over documents of each document's mean token NLL, in one padded forward pass.

    Its gradient is `sum_i g_i`, the sum of the per-document gradients a bank stores, so the meta-learning inner
    step sees what inference applies. Documents are right-padded; `attention_mask` marks real tokens.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    # Targets are shifted left and the last position (and padding) ignored, so that the loss runs on the logits as
    # they are: (batch * tokens, vocab) is a free view, and log-softmax over the contiguous last dimension is the
    # fast path (slicing and transposing the logits would copy them, the largest tensor of the pass).
    targets = input_ids.new_full(input_ids.shape, -100)
    targets[:, :-1] = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    token_nll = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none"
    ).view(targets.shape)
    predicted = (targets != -100).to(token_nll.dtype)
    return (token_nll.sum(dim=1) / predicted.sum(dim=1)).sum()


def combine(
    stacked_gradients: Mapping[str, torch.Tensor],
    step_sizes: Mapping[str, torch.Tensor],
    gamma: float,
    transform: GradientTransform | None = None,
) -> GradientDict:
    """The step `-gamma * alpha_t * T_t(sum_i g_{i,t})` for every tensor `t` (summed in float32, in document order;
    `T_t` the learned gradient transform, or none).

    Args:
        stacked_gradients (`Mapping[str, torch.Tensor]`): `{name: (k, *shape)}` gradients of k documents.
        step_sizes (`Mapping[str, torch.Tensor]`): `alpha_t` by name: scalars, or tensors that broadcast against
            the gradient (a column of per-row step sizes).
        gamma (`float`): test-time multiplier.
        transform ([`GradientTransform`], *optional*): applied to each summed gradient, untrained (no graph).

    Returns:
        `dict[str, torch.Tensor]`: the delta to add to each tensor, in float32.
    """
    missing = sorted(set(stacked_gradients) - set(step_sizes))
    if missing:
        raise ReGradKeyError(f"no step size for gradient tensors {missing[:3]}")
    steps = {}
    for name, gradients in stacked_gradients.items():
        documents = torch.arange(gradients.shape[0], device=gradients.device)[None]
        total = transformed_rows(summed_rows(gradients, documents), name, transform)
        steps[name] = scaled_steps(total, step_sizes[name], gamma)[0]
    return steps


def summed_rows(stacked: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """For each row of `documents`, the sum of those documents' gradients, in float32, added in order.

    Row `r` is `stacked[documents[r, 0]] + stacked[documents[r, 1]] + ...`: one `index_select` and one add per
    document position for all rows at once. [`combine`] sums one set of documents with it, and per-row serving
    ([`multi_lora.retrieval_row_tensors`]) many sets, so that every row's sum is bit for bit the swap path's.

    Args:
        stacked (`torch.Tensor`): `(documents, *shape)` gradients.
        documents (`torch.Tensor`): `(rows, k)` indices into the first axis of `stacked` (k >= 1).

    Returns:
        `torch.Tensor`: `(rows, *shape)`, float32, a fresh tensor.
    """
    total = stacked.index_select(0, documents[:, 0]).to(torch.float32)  # fresh already: index_select copies
    for position in range(1, documents.shape[1]):
        total += stacked.index_select(0, documents[:, position])  # added in float32, as `.float()` then add
    return total


def scaled_steps(totals: torch.Tensor, step_size: torch.Tensor, gamma: float) -> torch.Tensor:
    """`-gamma * step_size * totals`, in place on `totals` (float32 summed gradients, one per row on the first
    axis); `step_size` is a scalar or broadcastable to a row's shape.

    Raises:
        [`ReGradValueError`]: the step is not finite (a `gamma` so large that the product overflows float32, or
            NaN/inf gradients): applied, it would put NaN or inf into every adapted tensor.
    """
    steps = totals.mul_(-gamma * step_size.detach().to(device=totals.device, dtype=torch.float32))
    if not bool(torch.isfinite(steps.sum())) and not bool(torch.isfinite(steps).all()):
        raise ReGradValueError(
            f"the step -gamma * step_size * gradients is not finite (gamma={gamma:g}): gamma is too large for these "
            "gradients, or the gradients hold NaN or inf values"
        )
    return steps


def adapted_parameters(
    parameters: Mapping[str, torch.Tensor],
    summed_gradients: Mapping[str, torch.Tensor],
    step_sizes: Mapping[str, torch.Tensor],
    gamma: float = 1.0,
    transform: GradientTransform | None = None,
) -> GradientDict:
    """Functional form of the step, differentiable w.r.t. the parameters, the step sizes, the gradients and the
    gradient transform.

    Returns `{name: theta_t - gamma * alpha_t * T_t(g_t)}` (`T_t(g) = g` without a transform), ready for
    `torch.func.functional_call` (meta-learning). Tensors without a gradient are returned unchanged.
    """
    adapted = {}
    for name, parameter in parameters.items():
        gradient = summed_gradients.get(name)
        if gradient is not None and transform is not None:
            gradient = transform.apply(name, gradient)
        adapted[name] = parameter if gradient is None else parameter - gamma * step_sizes[name] * gradient
    return adapted

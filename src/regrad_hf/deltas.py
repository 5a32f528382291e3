"""The math of ReGrad: document gradients, the combined step, and applying it exactly and reversibly.

Nothing here knows about banks, files or generation: tensors in, tensors out.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .errors import ReGradKeyError, ReGradValueError

GradientDict = dict[str, torch.Tensor]


def check_documents(documents: Sequence[str]) -> None:
    """Raises [`ReGradValueError`] unless `documents` is a non-empty sequence of non-blank strings."""
    if isinstance(documents, str):
        raise ReGradValueError("documents must be a list of strings, not a single string")
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


def tokenize_document(tokenizer, document: str, max_tokens: int) -> list[int]:
    """Token ids of a document for its LM loss, truncated to `max_tokens` with a warning.

    Raises:
        [`ReGradValueError`]: when fewer than 2 tokens remain (there is nothing to predict).
    """
    ids = tokenizer(document, truncation=False)["input_ids"]
    if len(ids) > max_tokens:
        warnings.warn(
            f"document of {len(ids)} tokens truncated to max_document_tokens={max_tokens}", UserWarning, stacklevel=3
        )
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ReGradValueError(f"document {document!r} has fewer than 2 tokens: there is nothing to predict")
    return ids


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
    ids = tokenize_document(tokenizer, document, max_tokens)
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
) -> GradientDict:
    """Per-document gradients of several documents, stacked: `{name: tensor of shape (len(documents), *shape)}`.

    The model is put in eval mode (no dropout) for the computation and returned to its previous mode after.
    """
    check_documents(documents)
    was_training = model.training
    model.eval()
    try:
        per_document = [document_gradient(model, tokenizer, parameters, text, max_tokens) for text in documents]
    finally:
        model.train(was_training)
    return {name: torch.stack([gradients[name] for gradients in per_document]) for name in parameters}


def documents_lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sum over documents of each document's mean token NLL, in one padded forward pass.

    Its gradient is `sum_i g_i`, the sum of the per-document gradients a bank stores, so the meta-learning inner
    step sees what inference applies. Documents are right-padded; `attention_mask` marks real tokens.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    target_mask = attention_mask[:, 1:].to(logits.dtype)
    token_nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return ((token_nll * target_mask).sum(dim=1) / target_mask.sum(dim=1)).sum()


def combine(
    stacked_gradients: Mapping[str, torch.Tensor], step_sizes: Mapping[str, torch.Tensor], gamma: float
) -> GradientDict:
    """The step `-gamma * alpha_t * sum_i g_{i,t}` for every tensor `t` (summed in float32).

    Args:
        stacked_gradients (`Mapping[str, torch.Tensor]`): `{name: (k, *shape)}` gradients of k documents.
        step_sizes (`Mapping[str, torch.Tensor]`): `alpha_t` by name (scalars).
        gamma (`float`): test-time multiplier.

    Returns:
        `dict[str, torch.Tensor]`: the delta to add to each tensor, in float32.
    """
    missing = sorted(set(stacked_gradients) - set(step_sizes))
    if missing:
        raise ReGradKeyError(f"no step size for gradient tensors {missing[:3]}")
    return {
        name: (-gamma * step_sizes[name].detach().float()) * gradients.float().sum(dim=0)
        for name, gradients in stacked_gradients.items()
    }


def _check_delta(parameters: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> None:
    unknown = sorted(set(delta) - set(parameters))
    if unknown:
        raise ReGradKeyError(f"delta has tensors the model does not have: {unknown[:3]}")
    for name, value in delta.items():
        if tuple(value.shape) != tuple(parameters[name].shape):
            raise ReGradValueError(
                f"delta for {name} has shape {tuple(value.shape)}, the parameter has {tuple(parameters[name].shape)}"
            )


@contextmanager
def applied_delta(parameters: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Adds `delta` to `parameters` in place for the duration of the block, then restores them bit for bit.

    The restore copies saved values back (adding `-delta` would not round-trip in floating point) and runs in
    `finally`, so an exception inside the block, or while applying, leaves the parameters exactly as they were.
    Nothing is written when `delta` does not fit `parameters`.
    """
    _check_delta(parameters, delta)
    saved = {name: parameters[name].detach().clone() for name in delta}
    try:
        with torch.no_grad():
            for name, value in delta.items():
                target = parameters[name]
                target.add_(value.to(device=target.device, dtype=target.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                parameters[name].copy_(value)


def adapted_parameters(
    parameters: Mapping[str, torch.Tensor],
    summed_gradients: Mapping[str, torch.Tensor],
    step_sizes: Mapping[str, torch.Tensor],
    gamma: float = 1.0,
) -> GradientDict:
    """Functional form of the step, differentiable w.r.t. the parameters, the step sizes and the gradients.

    Returns `{name: theta_t - gamma * alpha_t * g_t}`, ready for `torch.func.functional_call` (meta-learning).
    Tensors without a gradient are returned unchanged.
    """
    return {
        name: parameter - gamma * step_sizes[name] * summed_gradients[name] if name in summed_gradients else parameter
        for name, parameter in parameters.items()
    }

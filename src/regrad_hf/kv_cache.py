"""The KV cache across transformers 5.x, which renamed `past_key_values` to `cache` (the forward's and generate's
keyword, and the output's field) within the major version this package supports."""

from __future__ import annotations

import inspect
from typing import Any


def cache_keyword(model) -> str:
    """The keyword `model`'s forward (and `generate`) takes a KV cache by: `"cache"` or `"past_key_values"`.

    Args:
        model: a transformers causal LM, or a wrapper with `.language_model` (e.g. [`ReGradForCausalLM`]).

    Returns:
        `str`: the keyword.
    """
    forward = getattr(model, "language_model", model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def returned_cache(outputs) -> Any | None:
    """The KV cache a forward returned (`outputs.cache`, or `outputs.past_key_values` before the rename), or `None`.

    Args:
        outputs: a transformers `ModelOutput`.

    Returns:
        The cache, or `None` when the forward returned none.
    """
    cache = outputs.get("cache")  # the old name only when the new one is absent: reading it logs a deprecation
    return cache if cache is not None else outputs.get("past_key_values")

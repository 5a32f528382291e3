"""regrad_hf.kv_cache: the KV cache keyword and field across transformers 5.x."""

from __future__ import annotations

import inspect
import warnings

import torch
from transformers.utils import ModelOutput

from regrad_hf.kv_cache import cache_keyword, returned_cache

from .conftest import make_tiny_model


def test_a_cache_passed_by_its_keyword_continues_the_prompt_without_deprecation_warnings(tokenizer):
    model = make_tiny_model(tokenizer)
    name = cache_keyword(model)
    assert name in inspect.signature(model.language_model.forward).parameters
    assert cache_keyword(model.language_model) == name  # a wrapper and the model it wraps agree
    ids = torch.tensor([[5, 9, 11, 14, 20]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        cache = returned_cache(model(input_ids=ids[:, :4], use_cache=True))
        assert cache is not None and cache.get_seq_length() == 4
        continued = model(input_ids=ids[:, 4:], use_cache=True, **{name: cache}).logits[0, -1]
        full = model(input_ids=ids).logits[0, -1]
    assert torch.allclose(continued, full, atol=1e-5)


def test_returned_cache_reads_the_field_of_either_name():
    marker = object()
    assert returned_cache(ModelOutput(past_key_values=marker)) is marker
    assert returned_cache(ModelOutput(cache=marker)) is marker
    assert returned_cache(ModelOutput(logits=torch.zeros(1))) is None

"""Checks of what reaches `generate`: a learner's saved `generation_config.json`, and the inputs of a
[`ReGradForCausalLM.generate`] call, so that a bad value is a typed error naming it, not an exception from deep
inside transformers (a `ZeroDivisionError` for `num_beams=0`, an `OverflowError` for a negative token id)."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import GenerationConfig

from ..errors import ReGradError, ReGradTypeError, ReGradValueError
from ..prompting import MAX_REPETITION_PENALTY

# Counts: a positive integer (or None); those of `_MIN_COUNTS` may also be 0 (`top_k=0` turns top-k filtering off).
_COUNTS = ("max_new_tokens", "max_length", "num_beams", "num_return_sequences", "num_beam_groups")
_MIN_COUNTS = ("min_new_tokens", "min_length", "no_repeat_ngram_size", "top_k")
# Settings that are positive finite numbers (or None).
_POSITIVE_NUMBERS = ("temperature", "top_p", "repetition_penalty", "typical_p")
_TOKEN_IDS = ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_list(value: object) -> list:
    return value if isinstance(value, list) else [value]


def check_generation_settings(settings: Mapping[str, object], where: str) -> None:
    """Raises [`ReGradValueError`] naming the first generation setting of `settings` with a value `generate` cannot
    use: a count that is not a positive integer, a temperature or top-p that is not a positive finite number, a token
    id that is not a non-negative integer (or a list of them), a `do_sample` or `apply_learner_prompt` that is not a
    bool, an `answer_repetition_penalty` outside 1 to `MAX_REPETITION_PENALTY`.

    Args:
        settings (`Mapping[str, object]`): generation settings (a `GenerationConfig`'s dict or `generate`'s kwargs).
        where (`str`): what holds them, for the message.
    """
    for name, value in settings.items():
        if value is None:
            continue
        if name == "generation_config":
            _check_generation_config(value, where)
            continue
        if name in _COUNTS and (not _is_int(value) or value < 1):
            wanted = "a positive integer"
        elif name in _MIN_COUNTS and (not _is_int(value) or value < 0):
            wanted = "a non-negative integer"
        elif name in _POSITIVE_NUMBERS and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf
        ):
            wanted = "a positive finite number"
        elif name in ("do_sample", "apply_learner_prompt") and not isinstance(value, bool):
            wanted = "True or False"
        elif name == "answer_repetition_penalty" and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= MAX_REPETITION_PENALTY
        ):
            wanted = f"a number from 1 (off) to {MAX_REPETITION_PENALTY:g}"
        elif name in _TOKEN_IDS and not all(
            _is_int(i) and i >= 0 for i in (value if isinstance(value, list) else [value])
        ):
            wanted = "a token id (a non-negative integer) or a list of them"
        else:
            continue
        raise ReGradValueError(f"{where}: {name} must be {wanted}, got {value!r:.80}")


def _check_generation_config(config: object, where: str) -> None:
    """A `generation_config=` argument: a `GenerationConfig` whose counts and numbers `generate` can use (its token
    ids are left to transformers, which tolerates some odd ones a model's own config may carry, e.g. a pad of -1)."""
    if not isinstance(config, GenerationConfig):
        raise ReGradTypeError(f"{where}: generation_config must be a GenerationConfig, got {type(config).__name__}")
    values = config.to_dict()
    check_generation_settings({k: v for k, v in values.items() if k not in _TOKEN_IDS}, f"{where}: generation_config")


def check_generate_inputs(inputs: object, kwargs: Mapping[str, object], vocab_size: int) -> None:
    """Checks the prompt of a `generate` call: `input_ids` (positional or keyword) a non-empty 2-D integer tensor of
    ids in the vocabulary, an `attention_mask` of its shape, and the generation settings given as keywords.

    Args:
        inputs (`object`): `generate`'s first argument.
        kwargs (`Mapping[str, object]`): its keyword arguments.
        vocab_size (`int`): the model's number of input embeddings.

    Raises:
        [`ReGradTypeError`]: `input_ids` is not a tensor.
        [`ReGradValueError`]: any other bad input (a 1-D or empty prompt, an id out of the vocabulary, ...).
    """
    check_generation_settings({k: v for k, v in kwargs.items() if k != "input_ids"}, "generate")
    input_ids = inputs if inputs is not None else kwargs.get("input_ids")
    if input_ids is None:
        return
    if not isinstance(input_ids, torch.Tensor):
        raise ReGradTypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):  # what an embedding takes (not uint8, int16, ...)
        raise ReGradValueError(
            f"input_ids must hold integer token ids (torch.long or torch.int), not {input_ids.dtype}"
        )
    if input_ids.dim() != 2:
        raise ReGradValueError(
            f"input_ids must be 2-D (batch, tokens), got shape {tuple(input_ids.shape)}"
            + ("; add the batch dimension: input_ids[None]" if input_ids.dim() == 1 else "")
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ReGradValueError(f"input_ids of shape {tuple(input_ids.shape)} is empty: give at least one token per row")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ReGradValueError(f"token id {low if low < 0 else high} is outside the vocabulary (0..{vocab_size - 1})")
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(input_ids.shape)):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ReGradValueError(f"attention_mask {shape} does not match input_ids {tuple(input_ids.shape)}")


def prompt_ids(prompt: object, tokenizer, vocab_size: int) -> tuple[list[int], bool]:
    """The token ids of one [`BatchingGenerator`] request's prompt, and whether it was text.

    Args:
        prompt (`object`): text (tokenized with `tokenizer`), a sequence of ints or a 1-D integer tensor.
        tokenizer: the generator's tokenizer (`None`: text prompts are refused).
        vocab_size (`int`): the model's number of input embeddings.

    Raises:
        [`ReGradTypeError`]: not text nor token ids (`bytes` too: they are not token ids).
        [`ReGradValueError`]: no tokenizer for text, text with lone surrogates, an empty prompt, an id outside the
            vocabulary, a tensor that is not 1-D integers.
    """
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ReGradValueError("a text prompt needs a tokenizer: pass tokenizer= or give token ids")
        if not prompt.isascii() and any("\ud800" <= c <= "\udfff" for c in prompt):  # no tokenizer encodes it
            raise ReGradValueError("the prompt is not valid Unicode text (lone surrogates)")
        ids = tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.dtype not in (torch.int32, torch.int64):
            raise ReGradValueError(
                f"a token-id prompt must be a 1-D integer tensor, got {prompt.dtype} of shape "
                f"{tuple(prompt.shape)}: give one prompt per request"
            )
        ids = prompt.tolist()
    elif not isinstance(prompt, (bytes, bytearray)) and isinstance(prompt, Sequence) and all(map(_is_int, prompt)):
        ids = list(prompt)
    else:
        raise ReGradTypeError(f"a prompt is a string or a sequence of token ids, got {type(prompt).__name__}")
    if not ids:
        raise ReGradValueError("the prompt is empty: give at least one token")
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ReGradValueError(f"token id {bad} is outside the model's vocabulary (0..{vocab_size - 1})")
    return ids, isinstance(prompt, str)


def check_total_tokens(prompt_length: int, kwargs: Mapping, generation_config, limit: int | None) -> None:
    """Refuses a request that may reach more than `limit` tokens, prompt and new tokens together, counted as
    `generate` counts them (`max_new_tokens`, else `max_length`, else those of `generation_config`).

    Raises:
        [`ReGradValueError`]: the request may go beyond `limit` (`None`: no limit).
    """
    if limit is None:
        return
    new = kwargs.get("max_new_tokens", None if "max_length" in kwargs else generation_config.max_new_tokens)
    total = prompt_length + new if new is not None else kwargs.get("max_length", generation_config.max_length)
    if total is not None and total > limit:
        raise ReGradValueError(
            f"this request may reach {total} tokens (a {prompt_length}-token prompt and its new tokens); at most "
            f"max_total_tokens={limit} are served"
        )


# What transformers' `generate` raises on an argument it cannot use (a bad streamer, stopping criteria, logits
# processor or assistant, a typo in a keyword, `bad_words_ids=[[-3]]`, `max_length` below the prompt, ...).
_REFUSAL_TYPES = (ValueError, TypeError, AttributeError, IndexError, KeyError, ArithmeticError)


def _raised_in_transformers(error: BaseException) -> bool:
    """Whether the innermost Python frame of `error`'s traceback is transformers' code (not a user's callback)."""
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and traceback.tb_frame.f_globals.get("__name__", "").startswith("transformers.")


@contextmanager
def transformers_refusals_typed() -> Iterator[None]:
    """Re-raises what transformers raises inside the block on a bad argument as a [`ReGradTypeError`] or
    [`ReGradValueError`] (chained to the original, whose message it repeats), so that `generate` keeps the library's
    error contract however deep transformers checks an argument.

    Only exceptions raised by transformers' own code are converted: one raised by a caller's streamer, stopping
    criterion or logits processor, a `RuntimeError` (out of memory) and a `BaseException` (`KeyboardInterrupt`) pass
    through unchanged.
    """
    try:
        yield
    except ReGradError:
        raise
    except _REFUSAL_TYPES as error:
        if not _raised_in_transformers(error):
            raise
        typed = ReGradTypeError if isinstance(error, (TypeError, AttributeError)) else ReGradValueError
        raise typed(f"generate cannot use its arguments: {type(error).__name__}: {error}") from error


# What `BatchingGenerator.submit` refuses: inputs the generator builds itself, outputs a result has no room for.
REFUSED_SUBMIT_KWARGS = {
    "inputs": "pass the prompt as the first argument",
    "input_ids": "pass the prompt as the first argument",
    "attention_mask": "the generator builds the batch's attention mask",
    "inputs_embeds": "prompts are text or token ids",
    "position_ids": "the generator builds the batch",
    "cache_position": "the generator builds the batch",
    "past_key_values": "a cache belongs to one call, not to a request",
    "streamer": "a streamer would see every row of the batch; call model.generate to stream",
    "return_dict_in_generate": "a result holds the new tokens; call model.generate for scores or hidden states",
    "output_scores": "a result holds the new tokens; call model.generate for scores",
    "output_logits": "a result holds the new tokens; call model.generate for logits",
    "output_attentions": "a result holds the new tokens; call model.generate for attentions",
    "output_hidden_states": "a result holds the new tokens; call model.generate for hidden states",
    "query": "pass query= as a keyword of submit (one string or None per request)",
}


def frozen_setting(value: Any) -> tuple:
    """A hashable stand-in for a generation kwarg: by value for plain data, by identity for objects (a
    `GenerationConfig`, a logits processor). The request keeps the object alive, so its id is not reused."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value)  # the type too: True, 1 and 1.0 are not the same setting
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(frozen_setting(item) for item in value))
    if isinstance(value, Mapping):
        return ("map", tuple(sorted((str(k), frozen_setting(v)) for k, v in value.items())))
    return ("object", id(value))


def check_timeout(timeout: object, name: str = "timeout") -> float | None:
    """A wait's `timeout` in seconds: `None` or `math.inf` mean none (returned as `None`); a number up to
    `threading.TIMEOUT_MAX` is returned as it is (0 or less: no wait).

    Raises:
        [`ReGradValueError`]: not a number (a bool, a string, NaN), or finite but larger than
            `threading.TIMEOUT_MAX` (the clocks of the waits overflow: pass `math.inf` or `None` for no timeout).
    """
    if timeout is None:
        return None
    if type(timeout) not in (int, float) or timeout != timeout:
        raise ReGradValueError(f"{name} must be a number of seconds or None, got {timeout!r:.40}")
    if timeout == math.inf:
        return None
    if timeout > threading.TIMEOUT_MAX:
        raise ReGradValueError(
            f"{name}={timeout:g} s is more than the longest wait, {threading.TIMEOUT_MAX:g} s; pass None or math.inf "
            "for no timeout"
        )
    return timeout


def positive_int(value: Any, name: str) -> int:
    """`value`, checked to be a positive `int` (not a bool); else [`ReGradValueError`] naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ReGradValueError(f"{name} must be a positive integer, got {value!r}")
    return value

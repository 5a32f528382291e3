"""`BatchingGenerator`: requests from many threads served as one heterogeneous batch, each caller getting what its
request gets from `model.generate` alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from regrad_hf import BatchingGenerator, GenerationResult, GenerationTimeoutError, GeneratorClosedError, ReGradError
from regrad_hf.errors import ReGradTypeError, ReGradValueError

GREEDY = {"max_new_tokens": 6, "do_sample": False}
LONG_WAIT_MS = 60_000  # batches then start only when full (or on close), whatever the machine's speed
PROMPTS = [
    "What is the capital of Zorbia?",
    "Tell me about the frame of the Velomar electric bicycle please",
    "Which mineral?",
    "What is the capital of Zorbia?",
    "Who discovered halvorite?",
    "How do you play Quillon?",
]


def alone(model, tokenizer, prompt, query="derived", **kwargs):
    """The new tokens `model.generate` gives the prompt on its own (no padding)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids if isinstance(prompt, str) else torch.tensor([prompt])
    if query is None:
        output = model.generate(input_ids=ids, use_bank=False, **kwargs)
    elif query == "derived":
        output = model.generate(input_ids=ids, **kwargs)
    else:
        output = model.generate(input_ids=ids, query=query, **kwargs)
    return output[0, ids.shape[1] :].tolist()


def count_calls(monkeypatch, model, fail_on_token: int | None = None) -> list[dict]:
    """Records every `model.generate` call (rows, kwargs); optionally fails a call whose batch has `fail_on_token`."""
    calls, generate = [], model.generate

    def counted(*args, **kwargs):
        calls.append({"rows": kwargs["input_ids"].shape[0], **kwargs})
        if fail_on_token is not None and (kwargs["input_ids"] == fail_on_token).any():
            raise ReGradValueError("this prompt cannot be served")
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counted)
    return calls


def test_concurrent_requests_are_one_batch_and_each_gets_what_it_gets_alone(
    tiny_model, tiny_bank, tokenizer, monkeypatch
):
    tiny_model.attach_bank(tiny_bank)
    token_prompt = tokenizer("Where is Quentville?").input_ids
    # Derived queries, explicit ones, a row without retrieval, a token-id prompt; prompts of different lengths.
    requests = [(p, "derived") for p in PROMPTS[:4]] + [(PROMPTS[4], "mineral"), (PROMPTS[5], None)]
    requests.append((token_prompt, "derived"))
    calls = count_calls(monkeypatch, tiny_model)
    barrier = threading.Barrier(len(requests))

    def client(request):
        prompt, query = request
        barrier.wait()  # all threads submit at once
        kwargs = {} if query == "derived" else {"query": query}
        return generator.generate(prompt, **kwargs, **GREEDY)

    with (
        BatchingGenerator(tiny_model, max_batch_size=len(requests), max_wait_ms=LONG_WAIT_MS) as generator,
        ThreadPoolExecutor(len(requests)) as pool,
    ):
        results = list(pool.map(client, requests))
    assert [call["rows"] for call in calls] == [len(requests)]  # one batched generate for all of them
    assert calls[0]["attention_mask"].sum(1).unique().numel() > 1  # left-padded rows of different lengths
    monkeypatch.undo()
    for (prompt, query), result in zip(requests, results, strict=True):
        assert isinstance(result, GenerationResult)
        assert result.token_ids == alone(tiny_model, tokenizer, prompt, query, **GREEDY)  # bit-equal greedy tokens
        if isinstance(prompt, str):
            assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
        else:
            assert result.text is None
    assert len({tuple(result.token_ids) for result in results}) >= 5  # the rows differ, or the test proves nothing


def test_results_end_at_eos_without_the_batch_padding(tiny_model, tokenizer, monkeypatch):
    # Make the longer prompt's row finish at once: its first new token is made the EOS token.
    long_prompt, short_prompt = PROMPTS[1], PROMPTS[2]
    first = alone(tiny_model, tokenizer, long_prompt, None, max_new_tokens=1, do_sample=False)[0]
    assert first not in alone(tiny_model, tokenizer, short_prompt, None, **GREEDY)
    settings = {**GREEDY, "eos_token_id": first, "pad_token_id": first + 1}
    with BatchingGenerator(tiny_model, max_batch_size=2, max_wait_ms=LONG_WAIT_MS) as generator:
        futures = [generator.submit(p, use_bank=False, **settings) for p in (long_prompt, short_prompt)]
    assert futures[0].result().token_ids == [first]  # the padding after it is dropped
    assert futures[1].result().token_ids == alone(tiny_model, tokenizer, short_prompt, None, **settings)


def test_requests_with_different_settings_are_never_batched_together(tiny_model, tiny_bank, tokenizer, monkeypatch):
    tiny_model.attach_bank(tiny_bank)
    calls = count_calls(monkeypatch, tiny_model)
    short, long = {"max_new_tokens": 3, "do_sample": False}, {"max_new_tokens": 6, "do_sample": False}
    settings = [short, long, long, short]
    with BatchingGenerator(tiny_model, max_batch_size=2, max_wait_ms=LONG_WAIT_MS) as generator:
        futures = [generator.submit(p, **s) for p, s in zip(PROMPTS, settings, strict=False)]
        results = [future.result() for future in futures]
    # The oldest request's settings go first; the others waited for the next batch.
    assert [(call["rows"], call["max_new_tokens"]) for call in calls] == [(2, 3), (2, 6)]
    monkeypatch.undo()
    for prompt, setting, result in zip(PROMPTS, settings, results, strict=False):
        assert result.token_ids == alone(tiny_model, tokenizer, prompt, **setting)
    # top_k_docs and gamma apply to a whole call, so they separate requests too.
    calls = count_calls(monkeypatch, tiny_model)
    with BatchingGenerator(tiny_model, max_batch_size=2, max_wait_ms=LONG_WAIT_MS) as generator:
        futures = [
            generator.submit(PROMPTS[0], gamma=0.5, **short),
            generator.submit(PROMPTS[1], top_k_docs=1, **short),
            generator.submit(PROMPTS[2], gamma=0.5, **short),
            generator.submit(PROMPTS[3], top_k_docs=1, **short),
        ]
        [future.result() for future in futures]
    assert [(call["rows"], call.get("gamma"), call.get("top_k_docs")) for call in calls] == [
        (2, 0.5, None),
        (2, None, 1),
    ]


def test_a_request_that_fails_in_a_batch_fails_only_its_caller(tiny_model, tiny_bank, tokenizer, monkeypatch):
    tiny_model.attach_bank(tiny_bank)
    prompts = [tokenizer(p).input_ids for p in PROMPTS[:3]]
    poison = max(max(p) for p in prompts) + 1
    prompts[1] = [*prompts[1], poison]
    calls = count_calls(monkeypatch, tiny_model, fail_on_token=poison)
    with BatchingGenerator(tiny_model, max_batch_size=3, max_wait_ms=LONG_WAIT_MS) as generator:
        futures = [generator.submit(p, **GREEDY) for p in prompts]
        # A request the model itself rejects (an unknown generate kwarg) fails alone, at its own batch.
        unknown = generator.submit(PROMPTS[0], not_a_generate_kwarg=1, **GREEDY)
        after = generator.submit(PROMPTS[3], **GREEDY)
    assert [call["rows"] for call in calls[:4]] == [3, 1, 1, 1]  # the batch, then its requests one by one
    assert isinstance(futures[1].exception(), ReGradValueError)
    assert isinstance(unknown.exception(), ValueError)
    monkeypatch.undo()
    for index in (0, 2):
        assert futures[index].result().token_ids == alone(tiny_model, tokenizer, prompts[index], **GREEDY)
    assert after.result().token_ids == alone(tiny_model, tokenizer, PROMPTS[3], **GREEDY)


def test_a_cancelled_request_is_dropped_and_the_others_are_served(tiny_model, tokenizer, monkeypatch):
    calls = count_calls(monkeypatch, tiny_model)
    generator = BatchingGenerator(tiny_model, max_batch_size=3, max_wait_ms=LONG_WAIT_MS)
    first = generator.submit(PROMPTS[0], **GREEDY)
    abandoned = generator.submit(PROMPTS[1], **GREEDY)
    assert abandoned.cancel()
    last = generator.submit(PROMPTS[2], **GREEDY)
    generator.close()
    assert abandoned.cancelled() and [call["rows"] for call in calls] == [2]
    monkeypatch.undo()
    assert first.result().token_ids == alone(tiny_model, tokenizer, PROMPTS[0], **GREEDY)
    assert last.result().token_ids == alone(tiny_model, tokenizer, PROMPTS[2], **GREEDY)


def test_close_serves_or_fails_the_pending_requests_and_refuses_new_ones(tiny_model, tokenizer):
    generator = BatchingGenerator(tiny_model, max_batch_size=8, max_wait_ms=LONG_WAIT_MS)
    pending = generator.submit(PROMPTS[0], **GREEDY)
    generator.close()  # serves it now, without waiting for the batch to fill
    assert pending.result().token_ids == alone(tiny_model, tokenizer, PROMPTS[0], **GREEDY)
    assert not generator._worker.is_alive()
    with pytest.raises(GeneratorClosedError, match="closed") as error:
        generator.submit(PROMPTS[0], **GREEDY)
    assert isinstance(error.value, ReGradError)
    generator.close()  # again: nothing happens

    generator = BatchingGenerator(tiny_model, max_batch_size=8, max_wait_ms=LONG_WAIT_MS)
    pending = generator.submit(PROMPTS[0], **GREEDY)
    generator.close(cancel_pending=True)
    assert isinstance(pending.exception(), GeneratorClosedError)
    assert not generator._worker.is_alive()

    with BatchingGenerator(tiny_model, max_wait_ms=0) as generator:
        result = generator.generate(PROMPTS[0], timeout=60, **GREEDY)
    assert result.token_ids == alone(tiny_model, tokenizer, PROMPTS[0], **GREEDY)
    assert not generator._worker.is_alive()


def test_a_caller_that_times_out_gets_a_typed_timeout_and_its_request_is_cancelled(tiny_model):
    generator = BatchingGenerator(tiny_model, max_batch_size=8, max_wait_ms=LONG_WAIT_MS)  # nothing starts soon
    with pytest.raises(GenerationTimeoutError, match="cancelled before it started") as error:
        generator.generate(PROMPTS[0], timeout=0.01, **GREEDY)
    assert isinstance(error.value, TimeoutError) and isinstance(error.value, ReGradError)
    generator.close()
    assert not generator._pending and not generator._worker.is_alive()


def test_a_caller_that_times_out_after_its_request_started_gets_a_timeout_and_the_batch_runs_on(
    tiny_model, monkeypatch
):
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    generate = tiny_model.generate

    def slow_generate(*args, **kwargs):  # the batch has started, and takes longer than the caller waits
        started.set()
        release.wait(60)
        try:
            return generate(*args, **kwargs)
        finally:
            finished.set()

    monkeypatch.setattr(tiny_model, "generate", slow_generate)
    generator = BatchingGenerator(tiny_model, max_wait_ms=0)  # the request starts at once
    with pytest.raises(GenerationTimeoutError, match="runs on, its result is dropped"):
        generator.generate(PROMPTS[0], timeout=5, **GREEDY)  # 5 s: ample time to start, even on a loaded machine
    assert started.is_set() and not finished.is_set()
    release.set()
    generator.close(timeout=60)  # the worker finishes the batch and stops
    assert finished.is_set() and not generator._worker.is_alive() and not generator._pending


@pytest.mark.parametrize(
    ("prompt", "kwargs", "error", "match"),
    [
        (3.5, {}, ReGradTypeError, "a prompt is a string"),
        ([1, True], {}, ReGradTypeError, "a prompt is a string"),
        ([], {}, ReGradValueError, "empty"),
        ([10**9], {}, ReGradValueError, "outside the model's vocabulary"),
        (torch.ones(1, 3, dtype=torch.long), {}, ReGradValueError, "1-D integer tensor"),
        ("Hi", {"query": 3}, ReGradTypeError, "query must be a string or None"),
        ("Hi", {"top_k_docs": 0}, ReGradValueError, "top_k_docs must be a positive integer"),
        ("Hi", {"gamma": float("nan")}, ReGradValueError, "gamma must be a finite number"),
        ("Hi", {"use_bank": "yes"}, ReGradTypeError, "use_bank"),
        ("Hi", {"max_new_tokens": 0}, ReGradValueError, "max_new_tokens must be a positive integer"),
        ("Hi", {"num_return_sequences": 2}, ReGradValueError, "num_return_sequences"),
        ("Hi", {"input_ids": torch.ones(1, 2)}, ReGradValueError, "does not take input_ids"),
        ("Hi", {"attention_mask": torch.ones(1, 2)}, ReGradValueError, "does not take attention_mask"),
        ("Hi", {"streamer": object()}, ReGradValueError, "does not take streamer"),
        ("Hi", {"output_scores": True}, ReGradValueError, "does not take output_scores"),
        # bytes are a sequence of ints, but not token ids; text no tokenizer can encode
        (b"Hi", {}, ReGradTypeError, "a prompt is a string or a sequence of token ids, got bytes"),
        ("Hi \udcff", {}, ReGradValueError, "not valid Unicode"),
        # settings that would fail inside the batch's generate (ValueError, TypeError deep in transformers)
        ("Hi", {"do_sample": True, "temperature": -1.0}, ReGradValueError, "temperature must be a positive"),
        ("Hi", {"eos_token_id": "x"}, ReGradValueError, "eos_token_id must be a token id"),
        ("Hi", {"top_k": "x"}, ReGradValueError, "top_k must be a non-negative integer"),
    ],
)
def test_bad_requests_are_refused_at_submit_with_a_typed_error(tiny_model, prompt, kwargs, error, match):
    with BatchingGenerator(tiny_model, max_wait_ms=0) as generator:
        with pytest.raises(error, match=match):
            generator.submit(prompt, **kwargs)
        assert not generator._pending  # nothing was queued


def test_a_timeout_that_is_not_a_number_is_refused_before_anything_is_queued(tiny_model):
    with BatchingGenerator(tiny_model, max_wait_ms=0) as generator:
        for timeout in ("1", float("nan"), True):
            with pytest.raises(ReGradValueError, match="timeout must be a number of seconds"):
                generator.generate([1, 2], max_new_tokens=1, timeout=timeout)
        assert not generator._pending


def test_a_request_longer_than_max_total_tokens_is_refused_and_one_within_is_served(tiny_model):
    prompt = [1, 2, 3, 4]
    with BatchingGenerator(tiny_model, max_wait_ms=0) as generator:  # default: the model's 512 positions
        assert generator.max_total_tokens == tiny_model.language_model.config.max_position_embeddings == 512
        for kwargs in ({"max_new_tokens": 10**12}, {"max_new_tokens": 509}, {"max_length": 513}):
            with pytest.raises(ReGradValueError, match="max_total_tokens=512"):
                generator.submit(prompt, **kwargs)
        assert not generator._pending
    with BatchingGenerator(tiny_model, max_wait_ms=0, max_total_tokens=6) as generator:
        with pytest.raises(ReGradValueError, match="may reach 7 tokens"):
            generator.submit(prompt, max_new_tokens=3, do_sample=False)
        result = generator.generate(prompt, max_new_tokens=2, do_sample=False)  # exactly at the limit
        assert len(result.token_ids) <= 2
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ReGradValueError, match="max_total_tokens must be a positive integer"):
            BatchingGenerator(tiny_model, max_total_tokens=bad)


def test_bad_generator_arguments_are_typed_errors(tiny_model, tiny_base):
    with pytest.raises(ReGradTypeError, match="serves a ReGradForCausalLM"):
        BatchingGenerator(tiny_base)
    with pytest.raises(ReGradValueError, match="max_batch_size"):
        BatchingGenerator(tiny_model, max_batch_size=0)
    with pytest.raises(ReGradValueError, match="max_wait_ms"):
        BatchingGenerator(tiny_model, max_wait_ms=-1)
    tokenizer, tiny_model.tokenizer = tiny_model.tokenizer, None
    try:
        with BatchingGenerator(tiny_model) as generator, pytest.raises(ReGradValueError, match="needs a tokenizer"):
            generator.submit("Hi")
    finally:
        tiny_model.tokenizer = tokenizer


def test_waiting_inside_a_block_that_holds_the_models_lock_is_refused(tiny_model, tiny_bank, tokenizer):
    tiny_model.attach_bank(tiny_bank)
    with BatchingGenerator(tiny_model, max_wait_ms=0) as generator:
        with tiny_model.retrieved("Zorbia"), pytest.raises(ReGradError, match="cannot wait inside"):
            generator.generate(PROMPTS[0], **GREEDY)  # the worker would wait for this thread's lock forever
        assert not generator._pending
        result = generator.generate(PROMPTS[0], **GREEDY)  # outside the block it is served
    assert result.token_ids == alone(tiny_model, tokenizer, PROMPTS[0], **GREEDY)

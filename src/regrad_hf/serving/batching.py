"""Micro-batching for servers: requests from many threads served as heterogeneous batches of one `generate` call.

A server thread per client calling `model.generate` one prompt at a time leaves batching on the table: a batch of
rows that retrieve different documents runs as one call ([`regrad_hf.adaptation.multi_lora`]).
[`BatchingGenerator`] collects the requests that arrive within a few milliseconds, left-pads them into one batch with
an attention mask, runs [`ReGradForCausalLM.generate`] once with one query per row, and hands each caller its own
row.

Example:
    ```python
    from regrad_hf import BatchingGenerator

    with BatchingGenerator(model, max_batch_size=16, max_wait_ms=5) as server:
        future = server.submit("What is the capital of Zorbia?", max_new_tokens=32, do_sample=False)
        print(future.result().text)  # or, blocking: server.generate(prompt, max_new_tokens=32)
    ```
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import check_gamma
from ..errors import (
    GenerationTimeoutError,
    GeneratorClosedError,
    ReGradError,
    ReGradTypeError,
    ReGradValueError,
)
from ..modeling.causal_lm import ReGradForCausalLM
from ..modeling.generation_checks import (
    REFUSED_SUBMIT_KWARGS,
    check_generation_settings,
    check_timeout,
    check_total_tokens,
    frozen_setting,
    positive_int,
    prompt_ids,
)
from ..modeling.query import prompt_to_query
from ..prompting import PromptTemplate

logger = logging.getLogger(__name__)


_FROM_PROMPT = object()  # `query` not given: retrieve for the prompt, as `model.generate` does


@dataclass(frozen=True)
class GenerationResult:
    """What one request generated.

    Attributes:
        token_ids (`list[int]`): the new tokens only (not the prompt), up to and including the end-of-sequence token
            when one was generated; the batch's padding after it is removed, so these are the tokens the request
            gets from `model.generate` on its own (greedy).
        text (`str` or `None`): `token_ids` decoded with `skip_special_tokens=True` when the prompt was text;
            `None` when it was token ids.
    """

    token_ids: list[int]
    text: str | None = None


@dataclass
class _Request:
    ids: list[int]
    is_text: bool
    query: Any  # str, None, or _FROM_PROMPT
    kwargs: dict[str, Any]  # generate kwargs, top_k_docs/gamma/use_bank included
    key: tuple  # requests with equal keys may share a batch
    future: Future = field(default_factory=Future)


def _resolve(future: Future, outcome: Any) -> None:
    """Sets a future's result, or its exception when `outcome` is one. A done callback that raises past
    `concurrent.futures` (which logs only `Exception`s), e.g. `SystemExit`, is logged and never stops the worker."""
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except BaseException as callback_error:  # the worker serves on; the future is resolved already
        if not future.done():  # the outcome itself could not be set (not a callback's doing)
            raise
        logger.error("a done callback of a BatchingGenerator request raised %r; ignored", callback_error)


class BatchingGenerator:
    """Serves `generate` requests from many threads in micro-batches on one worker thread.

    A batch starts when the oldest pending request has waited `max_wait_ms`, or as soon as `max_batch_size` requests
    with the same generation settings are pending. Requests whose settings differ (generation kwargs, `top_k_docs`,
    `gamma`, `use_bank`) never share a batch: they wait for the next one. Each row of a batch retrieves for its own
    query, so every request gets what it gets alone: greedy tokens are equal to those of `model.generate` on the
    request's prompt alone (sampling draws from one generator for the whole batch, so sampled tokens differ).

    A request that fails fails only its own caller: arguments are checked at [`submit`] (a typed error there), and
    when a batched call raises, its requests are served again one by one, so only the bad one gets the exception. A
    cancelled future is dropped before its batch starts. Done callbacks run on the worker thread: keep them short.

    Args:
        model ([`ReGradForCausalLM`]): the model; its attached bank is searched as `model.generate` does.
        tokenizer (*optional*): tokenizes text prompts and decodes results; defaults to `model.tokenizer`. Token-id
            prompts need none.
        max_batch_size (`int`, defaults to 8): the most requests in one batch.
        max_wait_ms (`float`, defaults to 5.0): how long the oldest pending request waits for others to join it.
        max_total_tokens (`int`, *optional*): the most tokens one request may reach, prompt and new tokens together
            (`max_new_tokens`, `max_length` or the generation config's); a request that could go beyond is refused at
            [`submit`], so that no client holds the worker for an unbounded time. Defaults to the base model's
            `max_position_embeddings` (unbounded when its config has none).
    """

    def __init__(
        self,
        model: ReGradForCausalLM,
        tokenizer=None,
        *,
        max_batch_size: int = 8,
        max_wait_ms: float = 5.0,
        max_total_tokens: int | None = None,
    ):
        if not isinstance(model, ReGradForCausalLM):
            raise ReGradTypeError(f"BatchingGenerator serves a ReGradForCausalLM, got {type(model).__name__}")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not 0 <= max_wait_ms < 1e6:
            raise ReGradValueError(f"max_wait_ms must be a number of milliseconds >= 0, got {max_wait_ms!r}")
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        self.max_batch_size = positive_int(max_batch_size, "max_batch_size")
        self.max_wait = max_wait_ms / 1000.0
        if max_total_tokens is None:
            max_total_tokens = getattr(model.language_model.config, "max_position_embeddings", None)
        if max_total_tokens is not None:
            max_total_tokens = positive_int(max_total_tokens, "max_total_tokens")
        self.max_total_tokens = max_total_tokens
        self._vocab_size = model.language_model.get_input_embeddings().num_embeddings
        self._pad_id = self._padding_token()
        self._pending: list[tuple[float, _Request]] = []  # (arrival time, request), oldest first
        self._closed = False
        self._condition = threading.Condition()
        self._worker = threading.Thread(target=self._serve, name="regrad-batching-generator", daemon=True)
        self._worker.start()

    def _padding_token(self) -> int:
        """Any token works as left padding (the attention mask hides it): the tokenizer's or model's pad, else EOS."""
        candidates = [getattr(self.tokenizer, "pad_token_id", None), self.model.generation_config.pad_token_id]
        eos = self.model.generation_config.eos_token_id
        candidates += eos if isinstance(eos, list) else [eos]
        return next((c for c in candidates if isinstance(c, int) and 0 <= c < self._vocab_size), 0)

    # ------------------------------------------------------------------ the callers' side

    def submit(
        self,
        prompt: str | Sequence[int] | torch.Tensor,
        *,
        query: str | None = _FROM_PROMPT,  # type: ignore[assignment]
        top_k_docs: int | None = None,
        gamma: float | None = None,
        use_bank: bool | None = None,
        **generate_kwargs,
    ) -> Future:
        """Queues one request and returns at once.

        Args:
            prompt (`str`, `Sequence[int]` or 1-D `torch.Tensor`): the prompt as text (tokenized with the
                generator's tokenizer, special tokens added as `tokenizer(prompt)` adds them) or as token ids.
            query (`str` or `None`, *optional*): what to retrieve for; `None` runs this request without retrieval.
                By default, the prompt's query, as `model.generate` derives it.
            top_k_docs, gamma, use_bank: as in [`ReGradForCausalLM.generate`].
            generate_kwargs: the generation settings (`max_new_tokens`, `do_sample`, `num_beams`, ...), passed to
                `model.generate`. Not accepted: the batch's inputs (`input_ids`, `attention_mask`, ...), `streamer`,
                extra outputs (`return_dict_in_generate`, `output_scores`, ...) and `num_return_sequences` > 1.

        Returns:
            `concurrent.futures.Future`: resolves to a [`GenerationResult`], or to the request's exception.

        Raises:
            [`GeneratorClosedError`] after [`close`]; [`ReGradValueError`] or [`ReGradTypeError`] for bad arguments.
        """
        request = self._request(prompt, query, top_k_docs, gamma, use_bank, generate_kwargs)
        with self._condition:
            if self._closed:
                raise GeneratorClosedError("the BatchingGenerator is closed: create a new one to submit requests")
            self._pending.append((time.monotonic(), request))
            self._condition.notify_all()
        return request.future

    def generate(self, prompt: str | Sequence[int] | torch.Tensor, *, timeout: float | None = None, **kwargs):
        """[`submit`] and wait: returns the request's [`GenerationResult`] or raises its exception.

        Args:
            timeout (`float`, *optional*): seconds to wait (`None` or `math.inf`: no limit); on expiry
                [`GenerationTimeoutError`] (a `TimeoutError`) is raised and the request is cancelled if it has not
                started. A finite value beyond `threading.TIMEOUT_MAX` raises [`ReGradValueError`].

        The calling thread's `knowledge`/`retrieved`/`injected` blocks do not apply (the worker thread generates);
        waiting inside one, or in a done callback (on the worker), raises [`ReGradError`] instead of deadlocking.
        """
        # The worker serves one batch at a time: a done callback (run on it) waiting for a result would wait for
        # itself. And it needs the model's lock to retrieve; a thread holding it (inside `knowledge`, `retrieved`,
        # `injected` or `disable_adapter`) would wait for a result that waits for it.
        if threading.current_thread() is self._worker:
            raise ReGradError(
                "BatchingGenerator.generate cannot wait on the generator's own worker thread (in a done callback): the "
                "worker would wait for itself; call submit() there, which returns a future at once"
            )
        if self.model._adaptation_lock._is_owned():
            raise ReGradError(
                "BatchingGenerator.generate cannot wait inside knowledge()/retrieved()/injected()/disable_adapter(): "
                "the worker needs the model's lock that this thread holds; call it outside the block"
            )
        timeout = check_timeout(timeout)
        future = self.submit(prompt, **kwargs)
        try:
            return future.result(timeout)
        except TimeoutError as error:
            fate = "was cancelled before it started" if future.cancel() else "runs on, its result is dropped"
            raise GenerationTimeoutError(f"no result within {timeout} s; the request {fate}") from error

    def _request(self, prompt, query, top_k_docs, gamma, use_bank, kwargs: dict) -> _Request:
        """The request, with every argument checked now, so that a bad one fails its caller and no batch."""
        ids, is_text = prompt_ids(prompt, self.tokenizer, self._vocab_size)
        if query is not _FROM_PROMPT and query is not None and not isinstance(query, str):
            raise ReGradTypeError(f"query must be a string or None (no retrieval), got {type(query).__name__}")
        refused = sorted(set(kwargs) & set(REFUSED_SUBMIT_KWARGS))
        if refused:
            raise ReGradValueError(f"submit does not take {refused[0]}: {REFUSED_SUBMIT_KWARGS[refused[0]]}")
        if kwargs.get("num_return_sequences", 1) != 1:
            raise ReGradValueError("a request returns one sequence: call model.generate for num_return_sequences > 1")
        check_generation_settings(kwargs, "submit")  # counts, temperature, token ids: fail here, not in the batch
        check_total_tokens(len(ids), kwargs, self.model.generation_config, self.max_total_tokens)
        if top_k_docs is not None:
            kwargs["top_k_docs"] = positive_int(top_k_docs, "top_k_docs")
        if gamma is not None:
            kwargs["gamma"] = check_gamma(gamma)
        if use_bank is not None:
            if not isinstance(use_bank, bool):
                raise ReGradTypeError(f"use_bank must be True, False or None, got {type(use_bank).__name__}")
            kwargs["use_bank"] = use_bank
        key = tuple(sorted((name, frozen_setting(value)) for name, value in kwargs.items()))
        return _Request(ids, is_text, query, kwargs, key)

    # ------------------------------------------------------------------ closing

    def close(self, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stops taking requests and stops the worker thread. Safe to call more than once.

        Args:
            cancel_pending (`bool`, defaults to `False`): `False` serves the pending requests first (at once, without
                waiting for `max_wait_ms`); `True` fails them with [`GeneratorClosedError`]. A batch already running
                finishes either way.
            timeout (`float`, *optional*): seconds to wait for the worker to finish.
        """
        timeout = check_timeout(timeout)
        with self._condition:
            self._closed = True
            if cancel_pending:
                self._fail_pending(GeneratorClosedError("the BatchingGenerator was closed before serving this request"))
            self._condition.notify_all()
        if threading.current_thread() is not self._worker:  # a done callback may close it
            self._worker.join(timeout)

    def _fail_pending(self, error: BaseException) -> None:
        for _, request in self._pending:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(error)
        self._pending.clear()

    def __enter__(self) -> BatchingGenerator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------ the worker

    def _serve(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run(batch)
        finally:  # also if the worker itself breaks: no caller waits forever
            with self._condition:
                self._closed = True
                self._fail_pending(GeneratorClosedError("the BatchingGenerator's worker stopped; create a new one"))

    def _next_batch(self) -> list[_Request] | None:
        """Waits for the oldest request's batch to be due, then takes up to `max_batch_size` requests with its
        settings (oldest first) whose futures were not cancelled. `None` once closed and drained."""
        with self._condition:
            while True:
                while not self._pending and not self._closed:
                    self._condition.wait()
                if not self._pending:
                    return None
                arrival, first = self._pending[0]
                due = arrival + self.max_wait
                while not self._closed and time.monotonic() < due and self._count(first.key) < self.max_batch_size:
                    self._condition.wait(due - time.monotonic())
                batch, kept = [], []
                for entry in self._pending:
                    if len(batch) < self.max_batch_size and entry[1].key == first.key:
                        if entry[1].future.set_running_or_notify_cancel():
                            batch.append(entry[1])
                    else:
                        kept.append(entry)
                self._pending = kept
                if batch:  # else every one of them was cancelled: look again
                    return batch

    def _count(self, key: tuple) -> int:
        return sum(request.key == key for _, request in self._pending)

    def _run(self, batch: list[_Request]) -> None:
        """Serves a batch; every one of its futures is resolved, whatever its callbacks raise.

        A request's own callbacks (a stopping criterion, a logits processor) may raise anything, `KeyboardInterrupt`
        and `SystemExit` included: it is that request's outcome, handed to its caller alone. When a batch raises, its
        requests are served again one by one so that only the request that raised gets the exception."""
        try:
            try:
                results = self._generate(batch)
            except BaseException as error:  # a request's callback may raise anything: its caller's alone
                for request in batch:
                    _resolve(request.future, error if len(batch) == 1 else self._alone(request))
                return
            for request, result in zip(batch, results, strict=True):
                _resolve(request.future, result)
        finally:  # no caller waits forever, whatever happened above
            for request in batch:
                if not request.future.done():
                    _resolve(request.future, GeneratorClosedError("the request's batch stopped; submit it again"))

    def _alone(self, request: _Request) -> GenerationResult | BaseException:
        """The request served in a batch of its own: its result, or what it raised (anything, as in [`_run`])."""
        try:
            return self._generate([request])[0]
        except BaseException as error:
            return error

    def _generate(self, batch: list[_Request]) -> list[GenerationResult]:
        """One `model.generate` call for the batch: left padding, an attention mask, one query per row."""
        width = max(len(request.ids) for request in batch)
        input_ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            input_ids[row, width - len(request.ids) :] = torch.tensor(request.ids)
            attention_mask[row, width - len(request.ids) :] = 1
        kwargs = batch[0].kwargs
        if all(request.query is _FROM_PROMPT for request in batch):
            query = None  # the model derives every row's query itself
        else:
            query = [self._query_of(request) for request in batch]
        device = self.model.device
        output = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), query=query, **kwargs
        )
        return [self._result(request, output[row, width:].tolist()) for row, request in enumerate(batch)]

    def _query_of(self, request: _Request) -> str | None:
        """A row's query in a batch that names some queries: what `model.generate` would derive for it alone."""
        if request.query is not _FROM_PROMPT:
            return request.query
        use_bank = request.kwargs.get("use_bank")
        if use_bank is False or (use_bank is None and (self.model.bank is None or not self.model.adapters_enabled())):
            return None  # alone, this prompt would not retrieve
        if self.model.tokenizer is None:
            raise ReGradError("the model has no tokenizer to derive a query with: pass query= or a tokenizer")
        return prompt_to_query(self.model.tokenizer, request.ids, PromptTemplate.from_config(self.model.config))

    def _result(self, request: _Request, new_tokens: list[int]) -> GenerationResult:
        """The row's new tokens, less the padding the batch adds after a finished row."""
        config = request.kwargs.get("generation_config") or self.model.generation_config
        eos = request.kwargs.get("eos_token_id", config.eos_token_id)
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        end = next((i + 1 for i, token in enumerate(new_tokens) if token in eos), None)
        if end is not None:
            new_tokens = new_tokens[:end]
        elif request.kwargs.get("stop_strings") or request.kwargs.get("stopping_criteria"):
            pad = request.kwargs.get("pad_token_id", config.pad_token_id)
            while new_tokens and pad is not None and new_tokens[-1] == pad:  # stopped early, then padded
                new_tokens = new_tokens[:-1]
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True) if request.is_text else None
        return GenerationResult(new_tokens, text)

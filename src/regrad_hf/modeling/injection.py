"""Knowledge injection of [`ReGradForCausalLM`]: the attached bank, the `knowledge`/`retrieved`/`injected` blocks,
and `generate` with retrieval (one swap for the batch, or per-row LoRA tensors when rows retrieve different
documents). A mixin so that modeling.py keeps construction, saving and the learner; the thread contract is in
[`ReGradForCausalLM`]'s docstring."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from .. import scopes
from ..adaptation import deltas, multi_lora
from ..bank import GradientBank, Hit
from ..config import check_gamma
from ..errors import ReGradError, ReGradTypeError, ReGradValueError
from ..prompting import PromptTemplate
from . import served
from .generation_checks import check_generate_inputs, transformers_refusals_typed
from .query import prompt_to_query

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11


class KnowledgeInjectionMixin:
    """Retrieval, the gradient step and its exact undo around `generate`. Needs the model's `bank`, `config`,
    `tokenizer`, `language_model`, `step_sizes`, `gradient_transform`, LoRA tensors (`_lora`, `_restore`), re-entrant
    lock (`_adaptation_lock`), `_bank_default_in_block` and `_adapted_generations`, and peft's conventions
    (`_refuse_inside_plain_base`, `adapters_enabled`)."""

    @property
    def prompt_template(self) -> PromptTemplate:
        """The prompt this learner was meta-trained with and is served with (its config's `system_prompt`,
        `user_template`, `document_template`, `answer_stop`): `model.prompt_template.build(model.tokenizer,
        question)` is the text to tokenize for `generate`."""
        return PromptTemplate.from_config(self.config)

    def attach_bank(self, bank: GradientBank, force: bool = False) -> None:
        """Attaches a bank; `generate` then retrieves from it. Raises [`BankMismatchError`] if another learner
        built it, unless `force=True`."""
        if not isinstance(bank, GradientBank):
            raise ReGradTypeError(f"attach_bank takes a GradientBank, got {type(bank).__name__}")
        with self._adaptation_lock:  # not while another thread's generate retrieves from the current bank
            if not force:
                bank.check_learner(self)
            self.bank = bank

    def detach_bank(self) -> GradientBank | None:
        """Detaches and returns the bank."""
        with self._adaptation_lock:
            bank, self.bank = self.bank, None
        return bank

    @contextmanager
    def _applied(self, stacked_gradients: Mapping[str, torch.Tensor], gamma: float | None) -> Iterator[None]:
        gamma = self.config.gamma if gamma is None else check_gamma(gamma)
        delta = deltas.combine(stacked_gradients, self.step_sizes(), gamma, self.gradient_transform)
        with self._adaptation_lock:
            self._refuse_inside_plain_base()
            with self._restore.applied(delta):
                yield

    @contextmanager
    def knowledge(self, documents: Sequence[str], gamma: float | None = None, use_bank: bool = False) -> Iterator[Self]:
        """Injects documents for the duration of the block, with gradients computed now (no bank needed).

        Inside the block, `generate` applies these documents' step alone: an attached bank is not searched, so that
        the answer comes from the documents given. Ask for both with `use_bank=True` here (every `generate` in the
        block then also retrieves, and the two steps add up), or per call with `generate(..., use_bank=True)` or
        `query=`. [`retrieved`] and [`injected`] nested inside add their documents' step too.

        Args:
            documents (`Sequence[str]`): the texts to inject.
            gamma (`float`, *optional*): step multiplier; defaults to `config.gamma`.
            use_bank (`bool`, defaults to `False`): whether `generate` inside the block also retrieves from the
                attached bank.

        Example:
            ```python
            with model.knowledge(["Ada Lovelace wrote the first program."]):
                model.generate(**inputs)
            ```
        """
        gamma = None if gamma is None else check_gamma(gamma)
        if not isinstance(use_bank, bool):
            raise ReGradTypeError(f"use_bank must be True or False, got {use_bank!r:.40}")
        if use_bank and self.bank is None:
            raise ReGradError("knowledge(use_bank=True) needs a bank: call model.attach_bank(bank) first")
        # One lock from the gradients to the restore: no other thread's adaptation between them.
        with (
            self._adaptation_lock,
            self._applied(self.document_gradients(documents), gamma),
            self._bank_default(use_bank),
        ):
            yield self

    @contextmanager
    def _bank_default(self, use_bank: bool) -> Iterator[None]:
        """Makes `use_bank` the default of `generate` calls made by this thread inside the block."""
        stack = self._bank_default_in_block.setdefault(threading.get_ident(), [])
        stack.append(use_bank)
        try:
            yield
        finally:
            stack.pop()
            if not stack:
                self._bank_default_in_block.pop(threading.get_ident(), None)

    def _default_use_bank(self) -> bool | None:
        """`generate`'s `use_bank` when none is given: off for the plain base model (`disable_adapter`, or adapters
        disabled) and inside an injecting block (unless `knowledge` asked for the bank); else `None`, meaning "when a
        bank is attached"."""
        stack = self._bank_default_in_block.get(threading.get_ident())
        if stack:
            return stack[-1]
        return None if self.adapters_enabled() else False

    @contextmanager
    def retrieved(self, query: str, top_k: int | None = None, gamma: float | None = None) -> Iterator[list[Hit]]:
        """Injects the `top_k` bank documents nearest to `query` for the duration of the block; yields the hits.

        `top_k` defaults to `config.top_k_docs`, or the whole bank when it holds fewer documents. As in [`knowledge`],
        `generate` inside the block applies this step alone and does not search the bank again (unless called with
        `use_bank=True` or `query=`, which adds a second step).
        """
        gamma = None if gamma is None else check_gamma(gamma)
        if not isinstance(query, str):  # one query: a list would be searched as several, giving lists of hits
            raise ReGradTypeError(f"retrieved takes one query string, got {type(query).__name__}")
        bank = self._require_bank()
        hits = bank.search(query, min(self.config.top_k_docs, len(bank)) if top_k is None else top_k)
        with self.injected([hit.id for hit in hits], gamma):
            yield hits

    @contextmanager
    def injected(self, ids: str | Sequence[str], gamma: float | None = None) -> Iterator[Self]:
        """Injects the bank documents with these ids (one id, or a sequence of them) for the duration of the block
        (retrieval done elsewhere).

        As in [`knowledge`], `generate` inside the block applies this step alone and does not search the bank
        (unless called with `use_bank=True` or `query=`, which adds a second step).
        """
        # gather type-checks `ids` (one id string, or a sequence of them) and refuses unknown ones
        with self._applied(self._require_bank().gather(ids), gamma), self._bank_default(False):
            yield self

    def _require_bank(self) -> GradientBank:
        if self.bank is None:
            raise ReGradError("no gradient bank attached: call model.attach_bank(bank) first")
        return self.bank

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        *args,
        query: str | Sequence[str | None] | None = None,
        top_k_docs: int | None = None,
        gamma: float | None = None,
        use_bank: bool | None = None,
        **kwargs,
    ):
        """`GenerationMixin.generate` with retrieval: retrieve, apply the gradient step, generate, restore.

        All arguments of the wrapped model's `generate` are accepted and passed on unchanged. The extra keyword
        arguments below are consumed here and never reach it.

        When every row of the batch retrieves the same documents, the step is applied to the shared LoRA tensors
        for the call (and restored after). When rows retrieve different documents, each row runs with its own LoRA
        tensors in one batched call ([`multi_lora.per_row_lora`]): no tensor is written, and rows that retrieve the
        same documents share one delta.

        Args:
            query (`str` or `Sequence[str | None]`, *optional*): what to retrieve for: one query for the batch, or one
                per row, `None` for a row that runs without retrieval. By default, each row's prompt decoded without
                special tokens, or only its last user turn when the prompt follows the tokenizer's chat template.
            top_k_docs (`int`, *optional*): documents per query; defaults to `config.top_k_docs`, or every document
                of a bank smaller than that.
            gamma (`float`, *optional*): step multiplier; defaults to `config.gamma`.
            use_bank (`bool`, *optional*): `False` generates with the learner as it is; `None` (default) uses the
                bank when one is attached, except inside [`knowledge`], [`retrieved`], [`injected`] (they inject
                their own documents) and [`disable_adapter`].

        Decoding: the model's `generation_config` (the learner's: greedy, the stop rule as `stop_strings`, the
        answer repetition penalty), under a `generation_config=` given and the call's settings, as transformers merges
        them; `answer_repetition_penalty=` and `apply_learner_prompt=` may be set per call too. With
        `apply_learner_prompt` (the default), a row that is plain text (no special token but a leading bos: a plain
        string tokenized, as `pipeline` does with one) is asked as the question of the learner's prompt
        (`prompt_template.build`); the output still starts with the row as given.

        Returns:
            What the wrapped model's `generate` returns.

        Raises:
            [`ReGradValueError`] or [`ReGradTypeError`]: a bad prompt (not a 2-D integer tensor, empty, ids outside
                the vocabulary, a mask of another shape) or setting (`max_new_tokens=0`, `num_beams=0`, ...).
        """
        settings = {**kwargs, "generation_config": args[0]} if args else kwargs  # generate(inputs, config, ...)
        check_generate_inputs(inputs, settings, self.language_model.get_input_embeddings().num_embeddings)
        gamma = None if gamma is None else check_gamma(gamma)
        if use_bank is not None and not isinstance(use_bank, bool):
            raise ReGradTypeError(f"use_bank must be True, False or None, got {use_bank!r:.40}")
        self._refuse_inside_adapted_generate()
        if isinstance(kwargs.get("assistant_model"), KnowledgeInjectionMixin):
            # transformers drives an assistant through its config and forward: the ReGrad wrapper has neither of the
            # language model's; its language model drafts with the learner as it is (this call's step, if it is us)
            kwargs["assistant_model"] = kwargs["assistant_model"].language_model
        given = args[0] if args else kwargs.pop("generation_config", None)
        with transformers_refusals_typed():
            config, kwargs = served.effective_config(self.generation_config, given, kwargs)
        plain = None
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if getattr(config, served.PROMPT_KEY, False) and input_ids is not None and self._has_chat_template():
            plain = served.PlainPrompts(input_ids, kwargs.get("attention_mask"), self.tokenizer, self.prompt_template)
            if plain.wrapped:
                inputs, kwargs = None, {**kwargs, "input_ids": plain.input_ids, "attention_mask": plain.attention_mask}
                input_ids = plain.input_ids
        width = input_ids.shape[1] if input_ids is not None else 0
        kwargs = served.learner_processors(config, kwargs, self.tokenizer, width)
        output = self._retrieving_generate(inputs, (config, *args[1:]), kwargs, query, top_k_docs, gamma, use_bank)
        return output if plain is None else plain.restore(output)

    def _has_chat_template(self) -> bool:
        return self.tokenizer is not None and isinstance(getattr(self.tokenizer, "chat_template", None), str)

    def _retrieving_generate(
        self,
        inputs: torch.Tensor | None,
        args: tuple,
        kwargs: dict,
        query: str | Sequence[str | None] | None,
        top_k_docs: int | None,
        gamma: float | None,
        use_bank: bool | None,
    ):
        """`generate` once its inputs and settings are checked: retrieval, the step, the wrapped model's `generate`."""
        with self._adaptation_lock:  # retrieval and the swap read or write the shared LoRA tensors
            self._restore.repair()  # a block whose restore an interrupt cut: its tensors are put back first
            if use_bank is None and query is None:
                use_bank = self._default_use_bank()
            if use_bank is not False:
                self._refuse_inside_plain_base()
            if use_bank is False or (use_bank is None and self.bank is None and query is None):
                return self._base_generate(inputs, args, kwargs)
            retrievals = self._retrieve_rows(self._queries(inputs, kwargs, query), top_k_docs)
            if len(set(retrievals)) == 1:
                if retrievals[0] is None:
                    return self._base_generate(inputs, args, kwargs)
                with self._applied(self.bank.gather(list(retrievals[0])), gamma), self._adapted_generation():
                    return self._base_generate(inputs, args, kwargs)
            row_tensors = self._row_tensors(retrievals, gamma)
        # Per-row generation reads only its own copies of the LoRA tensors (taken above, under the lock) and the base
        # weights, which nothing writes, and its hooks ignore other threads' forwards: it needs no lock.
        with multi_lora.per_row_lora(self.language_model, row_tensors), self._adapted_generation():
            return self._base_generate(inputs, args, kwargs)

    def _base_generate(self, inputs: torch.Tensor | None, args: tuple, kwargs: dict):
        with transformers_refusals_typed():
            return self.language_model.generate(inputs, *args, **kwargs)

    @contextmanager
    def _adapted_generation(self) -> Iterator[None]:
        """Marks the calling thread as inside a `generate` that runs with its own documents' step (see
        [`_refuse_inside_adapted_generate`])."""
        thread = threading.get_ident()
        marks = self._adapted_generations.setdefault(thread, [])
        frame = scopes.owner_frame()  # `generate`'s: a mark an interrupt leaves behind is stale once it returns
        marks.append(frame)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                marks.remove(frame)
            if not marks:
                self._adapted_generations.pop(thread, None)

    def _refuse_inside_adapted_generate(self) -> None:
        """Raises when this thread is inside a `generate` of this model that applied its retrieval's step: a call
        from its streamer, stopping criterion or logits processor would run with that step (swap) or that batch's
        per-row LoRA tensors (a mismatch error, or another batch's rows), not as the same call made on its own."""
        marks = self._adapted_generations.get(threading.get_ident(), [])
        marks[:] = [frame for frame in marks if scopes.is_running(frame)]  # left behind by an interrupt: dropped
        if marks:
            raise ReGradError(
                "generate was called from inside a generate call of the same model (by its streamer, stopping "
                "criteria or logits processor) that runs with retrieved documents injected: the inner call would "
                "run with them too; collect its inputs and call generate after the outer call returns"
            )

    def _queries(
        self, inputs: torch.Tensor | None, kwargs: dict, query: str | Sequence[str | None] | None
    ) -> list[str | None]:
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        batch_size = input_ids.shape[0] if input_ids is not None else 1
        if query is not None:
            if not isinstance(query, (str, Sequence)) or isinstance(query, (bytes, bytearray)):
                raise ReGradTypeError(f"query must be a string or a list of them (one per row), got {query!r:.40}")
            queries = [query] * batch_size if isinstance(query, str) else list(query)
            if len(queries) != batch_size:
                raise ReGradValueError(f"got {len(queries)} queries for a batch of {batch_size}")
            bad = [q for q in queries if q is not None and not isinstance(q, str)]
            if bad:
                raise ReGradValueError(f"each query must be a string or None (no retrieval), got {bad[0]!r}")
            return queries
        if input_ids is None or input_ids.dtype not in (torch.int32, torch.int64):
            raise ReGradValueError("without input_ids, generate needs an explicit query= to retrieve with")
        if self.tokenizer is None:
            raise ReGradError("the model has no tokenizer to decode the prompt with: pass query= or a tokenizer")
        mask = kwargs.get("attention_mask")
        rows = [ids if mask is None else ids[mask[i].bool()] for i, ids in enumerate(input_ids)]
        template = self.prompt_template  # retrieve on the question, not the instruction
        return [prompt_to_query(self.tokenizer, ids.tolist(), template) for ids in rows]

    def _retrieve_rows(self, queries: list[str | None], top_k: int | None) -> list[tuple[str, ...] | None]:
        """The ids of the documents each row retrieves, best first (`None` for a row without a query)."""
        distinct = list(dict.fromkeys(q for q in queries if q is not None))
        if not distinct:
            return [None] * len(queries)
        bank = self._require_bank()
        # The configured depth is served with the whole bank when the bank is smaller; an explicit k is not clamped.
        k = min(self.config.top_k_docs, len(bank)) if top_k is None else top_k
        # One query is searched as a string, exactly as `retrieved` does; several are embedded in one batch.
        hits = [bank.search(distinct[0], k)] if len(distinct) == 1 else bank.search(distinct, k)
        ids = {q: tuple(hit.id for hit in row_hits) for q, row_hits in zip(distinct, hits, strict=True)}
        return [None if q is None else ids[q] for q in queries]

    def _row_tensors(self, retrievals: list[tuple[str, ...] | None], gamma: float | None) -> dict[str, torch.Tensor]:
        """Each row's adapted LoRA tensors, stacked, from one gather of all the rows' documents."""
        gamma = self.config.gamma if gamma is None else gamma
        union = list(dict.fromkeys(doc_id for ids in retrievals if ids is not None for doc_id in ids))
        position = {doc_id: number for number, doc_id in enumerate(union)}
        rows = [None if ids is None else [position[doc_id] for doc_id in ids] for ids in retrievals]
        gathered = self.bank.gather(union)
        return multi_lora.retrieval_row_tensors(
            self._lora, gathered, rows, self.step_sizes(), gamma, self.gradient_transform
        )

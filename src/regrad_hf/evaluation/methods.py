"""The nine methods `regrad eval` compares, all answering the same questions with greedy decoding.

| method          | weights                                         | gradient step             | docs in prompt |
|-----------------|-------------------------------------------------|---------------------------|----------------|
| `closed_book`   | the base model (`model.disable_adapter()`)      | no                        | no             |
| `no_adaptation` | the learner (meta-trained LoRA)                 | no                        | no             |
| `rag`           | the base model                                  | no                        | retrieved      |
| `learner_icl`   | the learner                                     | no                        | retrieved      |
| `cpt`           | a copy of the base fine-tuned on the bank       | no                        | no             |
| `raw`           | the untrained LoRA start (B = 0: the base)      | yes, retrieved, untrained | no             |
| `regrad`        | the learner                                     | yes, retrieved            | no             |
| `regrad_icl`    | the learner                                     | yes, retrieved            | retrieved      |
| `sgd`           | the untrained LoRA start                        | N plain SGD steps, retr.  | no             |

`disable_adapter()` gives the true base model whatever the learner holds (every LoRA term exactly zero); a fresh
learner gives it too, because peft initialises B to zero, but a meta-trained learner does not (its B is non-zero).
`learner_icl` is a diagnostic: RAG read through the learner's start, which tells whether theta0 itself (before any
step) reads the documents worse than the base model does. `sgd` is a diagnostic ceiling: a few plain gradient steps on
the retrieved documents with no meta-learning (see [`regrad_hf.evaluation.sgd_ceiling`]).

Every method is asked with one [`PromptTemplate`] (system instruction, layout, stop rule): the fair comparison is
the same instruction for all, the documents in the prompt being the only difference.
"""

from __future__ import annotations

import copy
import math
import random
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from ..adaptation.deltas import tokenize_document
from ..data.collator import answer_suffix
from ..errors import ReGradValueError
from ..kv_cache import cache_keyword
from ..log import progress_bar
from ..modeling.learner_state import STEP_SIZES_KEY, TRANSFORM_KEY, learner_modules
from ..prompting import PromptTemplate
from .probe import candidate_log_probs, continuation_logits, next_token_score, prompt_cache
from .sgd_ceiling import SGDCeilingConfig, sgd_adapted

METHODS = ("closed_book", "no_adaptation", "rag", "learner_icl", "cpt", "raw", "sgd", "regrad", "regrad_icl")
LABELS = {
    "closed_book": "closed-book (base)",
    "no_adaptation": "no adaptation (learner)",
    "rag": "RAG (base + docs in prompt)",
    "learner_icl": "learner + docs, no step",
    "cpt": "CPT (fine-tuned on the documents)",
    "raw": "raw gradients (untrained LoRA)",
    "sgd": "SGD steps on the docs (untrained LoRA)",
    "regrad": "ReGrad",
    "regrad_icl": "ReGrad + ICL",
}
# What runs unless asked otherwise: `sgd` is a costly diagnostic (several gradient steps per question), run on request.
DEFAULT_METHODS = tuple(method for method in METHODS if method != "sgd")
RETRIEVING = ("rag", "learner_icl", "raw", "sgd", "regrad", "regrad_icl")
WITH_DOCUMENTS_IN_PROMPT = ("rag", "learner_icl", "regrad_icl")


def check_methods(methods: Sequence[str]) -> list[str]:
    """Validates method names; returns them in [`METHODS`] order."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ReGradValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    return [method for method in METHODS if method in methods]


def set_adapters_enabled(model, enabled: bool) -> None:
    """Switches every peft LoRA layer of `model` on or off, leaving the `requires_grad` flags as they were."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(flags[name])


@contextmanager
def base_only(model) -> Iterator[None]:
    """Runs the block on the base model: the model's `disable_adapter()` (its LoRA terms exactly zero under the model's
    lock, restored bit for bit after), not peft's switch, which would turn the LoRA layers off for every thread."""
    with model.disable_adapter():
        yield


def untrained_learner_state(model, seed: int) -> dict[str, torch.Tensor]:
    """A learner state as meta-training starts: peft's LoRA init (A Kaiming-uniform, B = 0) drawn with `seed`, step
    sizes at `config.init_step_size`, and the gradient transform (if any) at the identity. The model is left as it
    was."""
    with model.swapped_learner(model.learner_state_dict()), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.language_model.modules():
            if isinstance(module, LoraLayer):
                for adapter in module.lora_A:
                    module.reset_lora_parameters(adapter, True)
        state = {name: tensor.clone() for name, tensor in model.learner_state_dict().items()}
    step_sizes, transform = learner_modules(model.config, model.lora_parameters())
    state[STEP_SIZES_KEY] = step_sizes.raw.detach().clone()
    if transform is not None:
        state[TRANSFORM_KEY] = transform.raw.detach().clone()
    return state


@contextmanager
def bank_attached(model, bank) -> Iterator[None]:
    """Attaches `bank` for the block (its learner must be the model's current one), then re-attaches the previous
    bank without a check (the learner may be swapped back only after this block)."""
    previous = model.detach_bank()
    model.attach_bank(bank)
    try:
        yield
    finally:
        model.detach_bank()
        if previous is not None:
            model.attach_bank(previous, force=True)


@dataclass
class CPTConfig:
    """Continual pre-training baseline: LM loss on the documents, one document per optimiser step.

    Args:
        mode (`str`): `"full"` trains every base weight; `"lora"` trains the untrained LoRA start (the same
            tensors ReGrad steps on).
        epochs (`int`): passes over the documents (QA evaluation; drift counts documents instead).
        learning_rate (`float`): AdamW learning rate.
        seed (`int`): seed of the document order.
    """

    mode: str = "full"
    epochs: int = 1
    learning_rate: float = 2e-5
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("full", "lora"):
            raise ReGradValueError(f"CPT mode must be 'full' or 'lora', got {self.mode!r}")
        if self.epochs < 1 or self.learning_rate <= 0:
            raise ReGradValueError(
                f"CPT needs epochs >= 1 and learning_rate > 0, got {self.epochs}, {self.learning_rate}"
            )


class ContinualPretraining:
    """A copy of `model`'s base (or of its untrained LoRA start) being fine-tuned on documents; `model` itself is
    never written.

    Args:
        model ([`ReGradForCausalLM`]): the model to copy.
        config ([`CPTConfig`]): what to train and how.
        untrained_state (`Mapping[str, torch.Tensor]`): the untrained learner state (the LoRA start of `"lora"`).
    """

    def __init__(self, model, config: CPTConfig, untrained_state: Mapping[str, torch.Tensor]):
        bank = model.detach_bank()  # a bank is large and not needed by the copy
        try:
            self.model = copy.deepcopy(model)
        finally:
            if bank is not None:
                model.attach_bank(bank, force=True)
        self.config = config
        self.model.load_learner_state(untrained_state)
        lora = {id(p) for p in self.model.lora_parameters().values()}
        if config.mode == "full":
            set_adapters_enabled(self.model, False)
            trainable = [p for p in self.model.language_model.parameters() if id(p) not in lora]
        else:
            trainable = list(self.model.lora_parameters().values())
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        for parameter in trainable:
            parameter.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
        self.steps = 0
        self.seconds = 0.0
        self.losses: list[float] = []
        self.truncated_documents = 0

    def train(self, documents: Sequence[str], show_progress: bool = False) -> None:
        """One optimiser step per document, in the given order."""
        model, tokenizer = self.model, self.model.tokenizer
        max_tokens = model.config.max_document_tokens
        start = time.perf_counter()
        model.train()
        try:
            for text in progress_bar(documents, desc=f"CPT ({self.config.mode})", enabled=show_progress):
                # One count in the results instead of a truncation warning per optimiser step.
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    ids = tokenize_document(tokenizer, text, max_tokens)
                self.truncated_documents += bool(caught)
                input_ids = torch.tensor([ids], device=model.device)
                loss = model(input_ids=input_ids, labels=input_ids).loss
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.losses.append(loss.item())
                self.steps += 1
        finally:
            model.eval()
        self.seconds += time.perf_counter() - start

    @staticmethod
    def stream(documents: Sequence[str], epochs: int, seed: int) -> list[str]:
        """The training order: `epochs` passes over `documents`, each pass in a seeded random order."""
        order, stream = random.Random(seed), []
        for _ in range(epochs):
            shuffled = list(documents)
            order.shuffle(shuffled)
            stream += shuffled
        return stream

    def train_epochs(self, documents: Sequence[str], show_progress: bool = False) -> None:
        """`config.epochs` passes over `documents`, each in a seeded random order."""
        self.train(self.stream(documents, self.config.epochs, self.config.seed), show_progress)


@dataclass
class Answer:
    """One method's answer to one question, and how its model scores the reference answer (see
    [`regrad_hf.evaluation.probe`])."""

    prediction: str
    answer_nll: float
    prompt_tokens: int
    seconds: float
    first_token_nll: float = float("nan")
    first_token_top1: float = float("nan")
    probe_scores: list[float] | None = None


class MethodRunner:
    """Answers questions with each method.

    Args:
        model ([`ReGradForCausalLM`]): the learner, with its bank attached (`regrad`, `regrad_icl`).
        untrained_state (`Mapping[str, torch.Tensor]`, *optional*): the untrained learner state (`raw`).
        raw_bank ([`GradientBank`], *optional*): the bank built with the untrained learner (`raw`).
        cpt_model ([`ReGradForCausalLM`], *optional*): the fine-tuned copy (`cpt`).
        max_new_tokens (`int`): greedy answer length.
        gamma (`float`, *optional*): step multiplier; defaults to the learner's.
        prompt ([`PromptTemplate`], *optional*): the prompt every method is asked with; defaults to the learner's.
        num_beams (`int`): beam search width (1: greedy), the same for every method.
        sgd ([`SGDCeilingConfig`], *optional*): the `sgd` method's steps and learning rate (it also needs
            `untrained_state`).
    """

    def __init__(
        self,
        model,
        untrained_state=None,
        raw_bank=None,
        cpt_model=None,
        max_new_tokens=24,
        gamma=None,
        prompt=None,
        num_beams=1,
        sgd=None,
    ):
        self.model = model
        self.sgd = sgd or SGDCeilingConfig()
        self.prompt = prompt or PromptTemplate.from_config(model.config)
        self.untrained_state = untrained_state
        self.raw_bank = raw_bank
        self.cpt_model = cpt_model
        self.max_new_tokens = max_new_tokens
        self.gamma = gamma
        self.num_beams = num_beams

    @contextmanager
    def state(self, method: str, ids: Sequence[str], texts: Sequence[str] = ()) -> Iterator:
        """The model to use for `method`, set up (and restored after the block) with the documents `ids` (whose
        texts are `texts`) injected."""
        model = self.model
        with ExitStack() as stack:
            if method in ("closed_book", "rag"):
                stack.enter_context(base_only(model))
            elif method == "cpt":
                if self.cpt_model is None:
                    raise ReGradValueError("the cpt method needs the fine-tuned copy (cpt_model=)")
                model = self.cpt_model
            elif method == "raw":
                if self.untrained_state is None or self.raw_bank is None:
                    raise ReGradValueError("the raw method needs untrained_state= and raw_bank=")
                stack.enter_context(model.swapped_learner(self.untrained_state))
                stack.enter_context(bank_attached(model, self.raw_bank))
                stack.enter_context(model.injected(ids, self.gamma))
            elif method == "sgd":
                if self.untrained_state is None:
                    raise ReGradValueError("the sgd method needs untrained_state=")
                stack.enter_context(sgd_adapted(model, self.untrained_state, texts, self.sgd))
            elif method in ("regrad", "regrad_icl"):
                stack.enter_context(model.injected(ids, self.gamma))
            yield model

    def prompt_text(self, method: str, question: str, texts: Sequence[str]) -> str:
        """The prompt `method` is asked with: the shared template, with the documents where it reads them."""
        documents = list(texts) if method in WITH_DOCUMENTS_IN_PROMPT else None
        return self.prompt.build(self.model.tokenizer, question, documents)

    def answer(
        self,
        method: str,
        question: str,
        answer: str,
        ids: Sequence[str],
        texts: Sequence[str],
        candidates: Sequence[str] | None = None,
    ) -> Answer:
        """Answers `question` with `method`; `ids`/`texts` are the retrieved documents (ignored where unused).

        Args:
            candidates (`Sequence[str]`, *optional*): the knowledge probe's candidate answers (see
                [`probe_candidates`]), scored after the same prompt under the same adaptation; none: no probe.

        Returns:
            [`Answer`]: greedy prediction (cut by the template's stop rule), teacher-forced NLL of `answer` (mean
            over its tokens, end-of-turn included), its first token's NLL and whether that is the greedy next token,
            the candidates' mean token log-probabilities, prompt length and wall-clock seconds (gradient step and
            restore included, the probe's forward not).
        """
        tokenizer = self.model.tokenizer
        prompt_ids = tokenizer(self.prompt_text(method, question, texts), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer.strip() + answer_suffix(tokenizer), add_special_tokens=False)["input_ids"]
        encoded = [tokenizer(text.strip(), add_special_tokens=False)["input_ids"] for text in candidates or ()]
        probe_scores, probe_seconds = None, 0.0
        start = time.perf_counter()
        with self.state(method, ids, texts) as model:
            device = model.device
            # The prompt runs once: scoring the answer, the probe and greedy decoding continue from its cache (beam
            # search expands its own, so it starts afresh).
            cache = prompt_cache(model, prompt_ids)
            logits = continuation_logits(model, prompt_ids, answer_ids, cache)
            targets = torch.tensor(answer_ids, device=logits.device)
            nll = torch.nn.functional.cross_entropy(logits, targets).item()
            first = next_token_score(logits[0], answer_ids[0])
            del logits
            if encoded:
                probe_start = time.perf_counter()
                probe_scores = candidate_log_probs(model, prompt_ids, encoded, cache)
                probe_seconds = time.perf_counter() - probe_start
            prompt = torch.tensor([prompt_ids], device=device)
            reuse = {cache_keyword(model): cache} if cache is not None and self.num_beams == 1 else {}
            with torch.no_grad():
                output = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    num_beams=self.num_beams,
                    use_bank=False,
                    **reuse,
                    **self.prompt.generation_kwargs(tokenizer, len(prompt_ids)),
                )
        prediction = self.prompt.cut(tokenizer.decode(output[0, len(prompt_ids) :], skip_special_tokens=True))
        nll = nll if math.isfinite(nll) else float("nan")
        seconds = time.perf_counter() - start - probe_seconds
        return Answer(prediction, nll, len(prompt_ids), seconds, first.nll, float(first.top1), probe_scores)

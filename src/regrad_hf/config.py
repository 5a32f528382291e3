"""`ReGradConfig`: everything that defines a ReGrad learner, stored as `config.json`."""

from __future__ import annotations

import functools
import math
import warnings
from numbers import Real
from typing import Literal

from transformers import AutoConfig, PreTrainedConfig

from . import auto_registration
from .errors import ReGradError, ReGradTypeError, ReGradValueError
from .prompting import (
    CONCISE_SYSTEM_PROMPT,
    DEFAULT_DOCUMENT_TEMPLATE,
    DEFAULT_USER_TEMPLATE,
    LEGACY_PROMPT,
    check_text,
)
from .prompting import check_template as check_prompt_template

STEP_SIZE_MODES = ("tie", "row", "full", "same", "fix")
# How a bank may store gradients: the float formats, then the quantised ones (`regrad_hf.bank.quantization` implements
# each; a test keeps the two equal).
BANK_DTYPES = ("bfloat16", "float16", "float32", "int8", "int4", "int3", "int2")
# Bounds of the integer settings: far above any sensible value, low enough that a typo (an extra digit, 2**26) is
# refused before it allocates gigabytes.
INT_BOUNDS = {
    "lora_rank": (1, 4096),
    "top_k_docs": (1, 1024),
    "max_document_tokens": (2, 1 << 20),
}
MAX_TARGET_LAYER = 100_000
MAX_TRANSFORM_RANK = 4096
MAX_STEP_SIZE = 1e6
MAX_NAME_CHARS = 4096
STEP_SIZE_PARAMETRIZATIONS = ("log", "linear")
PROMPT_FIELDS = ("system_prompt", "user_template", "document_template", "answer_stop", "answer_repetition_penalty")

# Keys that `PreTrainedConfig.__post_init__` consumes itself; anything else we do not know is reported.
_BASE_CONFIG_KEYS = frozenset(
    {
        "name_or_path",
        "_name_or_path",
        "_commit_hash",
        "attn_implementation",
        "experts_implementation",
        "output_attentions",
        "torch_dtype",
        "model_type",
        "use_cache",  # Trainer sets it on every model config it trains
    }
)
_RUNTIME_ONLY_KEYS = ("attn_implementation", "experts_implementation")


class ReGradConfig(PreTrainedConfig):
    r"""
    Configuration of a ReGrad learner: which LoRA tensors receive document gradients, how the step sizes are
    parametrised, and the retrieval defaults used at generation time.

    Args:
        base_model_name_or_path (`str`, *optional*):
            Hub id or local path of the wrapped causal LM. Filled in by [`ReGradForCausalLM.from_base`].
        base_model_revision (`str`, *optional*):
            Revision of the base model, recorded so that a learner is reloaded on the weights it was built on.
        lora_rank (`int`, defaults to 16):
            Rank `r` of the LoRA adapters (1 to 4096).
        lora_alpha (`float`, defaults to 32):
            LoRA scaling numerator (the adapter output is scaled by `lora_alpha / lora_rank`).
        target_modules (`list[str]`, *optional*):
            Suffixes of the linear modules that carry LoRA tensors, e.g. `["gate_proj", "up_proj", "down_proj"]`.
            `None` picks the MLP projections of the model family automatically.
        target_layers (`list[int]`, *optional*):
            Indices of the decoder layers that carry LoRA tensors. `None` means the upper half.
        step_size_mode (`str`, defaults to `"tie"`):
            `"tie"`: one learned step size per LoRA tensor; `"row"`: one per row of each LoRA tensor (per output
            feature of `lora_B`, per rank component of `lora_A`); `"full"`: one per element (Meta-SGD, the paper's
            `alpha_mode: full`; as many step sizes as LoRA values); `"same"`: one learned step size for all;
            `"fix"`: `init_step_size` everywhere, never trained.
        step_size_parametrization (`str`, defaults to `"log"`):
            `"log"` stores `log(alpha)` (step sizes stay positive and are trained on a relative scale);
            `"linear"` stores `alpha` itself.
        gradient_transform_rank (`int`, *optional*):
            `None` (default): the step uses the summed gradient as it is. An integer `k` (0 to 4096) adds a learned
            linear transform of the summed gradient of each LoRA tensor, `G' = L G R`, trained with the step sizes:
            full matrices on the LoRA-rank side, diagonal plus rank `k` on the feature side (0: diagonal only),
            starting at the identity (see [`~regrad_hf.adaptation.transform.GradientTransform`]).
        init_step_size (`float`, defaults to 0.3):
            Initial step size `alpha_t`. 0.3 (log-parametrised) is where meta-training was measured to start well
            (DESIGN.md section 1); at 1e-2 a document's own gradient changes its NLL by less than 0.01 nats.
        gamma (`float`, defaults to 1.0):
            Test-time multiplier of the step; a finite number.
        top_k_docs (`int`, defaults to 3):
            Number of documents retrieved per query (1 to 1024). (Not `top_k`, which generation configs read as the
            sampling parameter.)
        max_document_tokens (`int`, defaults to 512):
            Documents longer than this (2 to 2**20) are truncated (with a warning) before their gradient is computed.
        embedder (`str`, *optional*):
            sentence-transformers model used to index documents. `None` is the embedded all-MiniLM-L6-v2.
        bank_dtype (`str`, defaults to `"bfloat16"`):
            dtype of the gradients stored in a [`GradientBank`].
        system_prompt (`str`, *optional*, defaults to a concise-answer instruction):
            The system turn of the question prompt the learner is trained and served with; `None` sends none.
        user_template (`str`, defaults to `"{context}Question: {question}\nAnswer:"`):
            The user turn: `{question}`, and `{context}` for the documents when the prompt carries them.
        document_template (`str`, defaults to `"{document}\n\n"`):
            How each document is written into `{context}` (`{document}`, `{index}` from 1).
        answer_stop (`str`, defaults to `"line"`):
            `"line"`: an answer ends at the end of its first line or of the turn; `"turn"`: at the end of the turn.
        answer_repetition_penalty (`float`, defaults to 1.0):
            Repetition penalty on the tokens an answer has already produced (not the prompt's); 1 is off.
            (The five prompt fields make a [`~regrad_hf.prompting.PromptTemplate`]; a config.json saved without them
            loads with [`~regrad_hf.prompting.LEGACY_PROMPT`], the prompt such learners were trained with.)

    Every value is checked when the config is created or loaded (types, and bounds far above sensible values, so
    that a typo such as `lora_rank=2**26` is refused before it allocates gigabytes): a bad one raises
    [`ReGradValueError`] naming it.
    """

    model_type = "regrad"

    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    lora_rank: int = 16
    lora_alpha: float = 32.0
    target_modules: list[str] | None = None
    target_layers: list[int] | None = None
    step_size_mode: Literal["tie", "row", "full", "same", "fix"] = "tie"
    step_size_parametrization: Literal["log", "linear"] = "log"
    gradient_transform_rank: int | None = None
    init_step_size: float = 0.3
    gamma: float = 1.0
    top_k_docs: int = 3
    max_document_tokens: int = 512
    embedder: str | None = None
    bank_dtype: Literal["bfloat16", "float16", "float32", "int8", "int4", "int3", "int2"] = "bfloat16"
    system_prompt: str | None = CONCISE_SYSTEM_PROMPT
    user_template: str = DEFAULT_USER_TEMPLATE
    document_template: str = DEFAULT_DOCUMENT_TEMPLATE
    answer_stop: Literal["line", "turn"] = "line"
    answer_repetition_penalty: float = 1.0

    @staticmethod
    def _with_legacy_prompt(config_dict: dict) -> dict:
        # A config.json written before the prompt fields existed: its learner was trained with the legacy prompt.
        if "transformers_version" in config_dict and not set(PROMPT_FIELDS) & set(config_dict):
            return {**config_dict, **{name: getattr(LEGACY_PROMPT, name) for name in PROMPT_FIELDS}}
        return config_dict

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        return super().from_dict(cls._with_legacy_prompt(config_dict), **kwargs)

    @classmethod
    def from_json_file(cls, json_file):
        return cls(**cls._with_legacy_prompt(cls._dict_from_json_file(json_file)))

    def __post_init__(self, **kwargs):
        unknown = sorted(set(kwargs) - _BASE_CONFIG_KEYS)
        if unknown:
            warnings.warn(f"ReGradConfig ignores unknown keys: {', '.join(unknown)}", UserWarning, stacklevel=3)
            for key in unknown:
                kwargs.pop(key)
        # The wrapper runs no attention of its own (the base model's config says how it runs): an implementation
        # named here ("sdpa" in a config.json, from an Auto class) would only make the wrapper refuse to be built.
        for key in _RUNTIME_ONLY_KEYS:
            kwargs.pop(key, None)
        self._validate()
        try:
            super().__post_init__(**kwargs)
        except (ValueError, TypeError, AttributeError, KeyError) as error:  # e.g. dtype="float99"
            raise ReGradValueError(
                f"ReGradConfig has a setting transformers refuses ({type(error).__name__}: {error})"
            ) from error
        auto_registration.config_built()  # the first config registers ReGradForCausalLM too

    def __setattr__(self, name: str, value) -> None:
        # A field changed after construction is checked as the constructor checks it, and a refused value is not
        # kept: `config.gamma = float("nan")` fails here, not deep inside a later generate().
        if name not in _OWN_FIELDS or name not in self.__dict__:
            return super().__setattr__(name, value)
        previous = self.__dict__[name]
        super().__setattr__(name, value)
        try:
            self._validate()
        except ReGradError:
            super().__setattr__(name, previous)
            raise

    def _validate(self) -> None:
        if self.step_size_mode not in STEP_SIZE_MODES:
            raise ReGradValueError(f"step_size_mode must be one of {STEP_SIZE_MODES}, got {self.step_size_mode!r}")
        if self.step_size_parametrization not in STEP_SIZE_PARAMETRIZATIONS:
            raise ReGradValueError(
                f"step_size_parametrization must be one of {STEP_SIZE_PARAMETRIZATIONS}, "
                f"got {self.step_size_parametrization!r}"
            )
        if self.bank_dtype not in BANK_DTYPES:
            raise ReGradValueError(
                f"bank_dtype must be one of {list(BANK_DTYPES)}, got {self.bank_dtype!r} (bfloat16 is the default; "
                "int8, int4, int3 and int2 are quantised formats with per-group scales)"
            )
        for name, (low, high) in INT_BOUNDS.items():
            value = getattr(self, name)
            if not _is_int(value) or not low <= value <= high:
                raise ReGradValueError(f"{name} must be an integer from {low} to {high}, got {_short(value)}")
        rank = self.gradient_transform_rank
        if rank is not None and (not _is_int(rank) or not 0 <= rank <= MAX_TRANSFORM_RANK):
            raise ReGradValueError(
                f"gradient_transform_rank must be None (no transform) or an integer from 0 to {MAX_TRANSFORM_RANK}, "
                f"got {_short(rank)}"
            )
        if not _is_real(self.lora_alpha) or not 0 < self.lora_alpha <= 1e6:
            raise ReGradValueError(f"lora_alpha must be a number in (0, 1e6], got {_short(self.lora_alpha)}")
        if not _is_real(self.init_step_size) or not 0 < self.init_step_size <= MAX_STEP_SIZE:
            raise ReGradValueError(
                f"init_step_size must be a positive number of at most {MAX_STEP_SIZE:g}, "
                f"got {_short(self.init_step_size)}"
            )
        check_gamma(self.gamma)
        for name in ("lora_alpha", "init_step_size", "gamma"):  # a Fraction or numpy scalar is not JSON: save a float
            if type(getattr(self, name)) not in (int, float):
                setattr(self, name, float(getattr(self, name)))
        if self.target_modules is not None:
            names = self.target_modules
            if not isinstance(names, (list, tuple)) or not names:
                raise ReGradValueError("target_modules must be None (automatic) or a non-empty list of module names")
            bad = [n for n in names if not isinstance(n, str) or not n.strip() or len(n) > MAX_NAME_CHARS]
            if bad:
                raise ReGradValueError(f"target_modules must be non-empty module-name strings, got {_short(bad[0])}")
        if self.target_layers is not None:
            layers = self.target_layers
            if not isinstance(layers, (list, tuple)) or not layers:
                raise ReGradValueError("target_layers must be None (upper half) or a non-empty list of layer indices")
            bad = [i for i in layers if not _is_int(i) or not 0 <= i <= MAX_TARGET_LAYER]
            if bad:
                raise ReGradValueError(f"target_layers must be layer indices from 0, got {_short(bad[0])}")
            if len(set(layers)) != len(layers):
                raise ReGradValueError(f"target_layers lists a layer twice: {list(layers)}")
        check_text("system_prompt", self.system_prompt, optional=True)
        check_prompt_template(
            self.user_template, self.document_template, self.answer_stop, self.answer_repetition_penalty
        )
        for name in ("base_model_name_or_path", "base_model_revision", "embedder"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS):
                raise ReGradValueError(f"{name} must be None or a non-empty string, got {_short(value)}")
            check_text(name, value, optional=True)  # no lone surrogate: it names a path or a repo


_OWN_FIELDS = frozenset(name for name in ReGradConfig.__dataclass_fields__ if name not in _BASE_CONFIG_KEYS)
_keyword_only_init = ReGradConfig.__init__


@functools.wraps(_keyword_only_init)
def _init(self, *args, **kwargs) -> None:
    if args:  # transformers' own refusal is a plain ValueError
        raise ReGradTypeError(f"ReGradConfig takes keyword arguments only (e.g. lora_rank=16), got {len(args)} more")
    _keyword_only_init(self, **kwargs)


ReGradConfig.__init__ = _init
# `AutoConfig.from_pretrained(regrad_repo)` builds a ReGradConfig (when this module is imported: see auto_registration).
AutoConfig.register(ReGradConfig.model_type, ReGradConfig, exist_ok=True)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A finite real number, not a bool; an integer too large for a float (`10**400`) is not finite."""
    if not isinstance(value, Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_gamma(gamma) -> float:
    """Returns `gamma` as a float; raises [`ReGradValueError`] unless it is a finite real number (not a bool).

    `gamma` multiplies the whole step: a NaN or an infinity would put NaN in every adapted tensor.
    """
    if not _is_real(gamma):
        raise ReGradValueError(f"gamma must be a finite number, got {_short(gamma)}")
    return float(gamma)

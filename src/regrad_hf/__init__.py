"""regrad-hf: Retrievable Gradients (ReGrad) for Hugging Face transformers."""

from transformers import AutoConfig, AutoModelForCausalLM

from .bank import GradientBank, Hit
from .config import ReGradConfig
from .data import Task
from .defaults import DEFAULT_EMBEDDER_ID, EMBEDDED_MODEL_ID
from .errors import (
    BankMismatchError,
    BankNotFoundError,
    GenerationTimeoutError,
    GeneratorClosedError,
    InferenceModeError,
    ReGradError,
    ReGradFileError,
    ReGradHubError,
    ReGradKeyError,
    ReGradTypeError,
    ReGradValueError,
)
from .modeling import ReGradForCausalLM
from .serving import BatchingGenerator, GenerationResult

__version__ = "0.1.0"

# `AutoModelForCausalLM.from_pretrained(regrad_repo)` and `pipeline(model=regrad_repo)` then build a ReGradForCausalLM.
AutoConfig.register(ReGradConfig.model_type, ReGradConfig, exist_ok=True)
AutoModelForCausalLM.register(ReGradConfig, ReGradForCausalLM, exist_ok=True)

# The trainer pulls in transformers.Trainer and accelerate: import it only when it is asked for.
_LAZY = {"ReGradTrainer": "training", "ReGradTrainingArguments": "training"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BatchingGenerator",
    "DEFAULT_EMBEDDER_ID",
    "EMBEDDED_MODEL_ID",
    "BankMismatchError",
    "InferenceModeError",
    "BankNotFoundError",
    "GenerationResult",
    "GenerationTimeoutError",
    "GeneratorClosedError",
    "GradientBank",
    "Hit",
    "ReGradConfig",
    "ReGradError",
    "ReGradFileError",
    "ReGradForCausalLM",
    "ReGradHubError",
    "ReGradKeyError",
    "ReGradTrainer",
    "ReGradTrainingArguments",
    "ReGradTypeError",
    "ReGradValueError",
    "Task",
]

"""regrad-hf: Retrievable Gradients (ReGrad) for Hugging Face transformers."""

from .bank import GradientBank, Hit
from .config import ReGradConfig
from .data import Task
from .defaults import DEFAULT_EMBEDDER_ID, EMBEDDED_MODEL_ID
from .errors import BankMismatchError, ReGradError, ReGradKeyError, ReGradValueError
from .modeling import ReGradForCausalLM

__version__ = "0.1.0"

# The trainer pulls in transformers.Trainer and accelerate: import it only when it is asked for.
_LAZY = {"ReGradTrainer": "training", "ReGradTrainingArguments": "training"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_EMBEDDER_ID",
    "EMBEDDED_MODEL_ID",
    "BankMismatchError",
    "GradientBank",
    "Hit",
    "ReGradConfig",
    "ReGradError",
    "ReGradForCausalLM",
    "ReGradKeyError",
    "ReGradTrainer",
    "ReGradTrainingArguments",
    "ReGradValueError",
    "Task",
]

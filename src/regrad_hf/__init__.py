"""regrad-hf: Retrievable Gradients (ReGrad) for Hugging Face transformers."""

from .bank import GradientBank, Hit
from .config import ReGradConfig
from .defaults import DEFAULT_EMBEDDER_ID, EMBEDDED_MODEL_ID
from .errors import BankMismatchError, ReGradError, ReGradKeyError, ReGradValueError
from .modeling import ReGradForCausalLM

__version__ = "0.1.0"

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
    "ReGradValueError",
]

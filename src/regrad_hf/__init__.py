"""regrad-hf: Retrievable Gradients (ReGrad) for Hugging Face transformers.

`import regrad_hf` is cheap: each public name below is imported on first use (PEP 562), so that the `regrad` command
(in `regrad_hf.cli`) answers `--help` without torch. `ReGradConfig` and `ReGradForCausalLM` still join transformers'
Auto classes before anyone can ask them for a ReGrad model (see [`regrad_hf.auto_registration`]).
"""

import importlib
from typing import TYPE_CHECKING

from . import auto_registration
from .errors import (
    BankMismatchError,
    BankNotFoundError,
    EmbeddedModelMissingError,
    GenerationTimeoutError,
    GeneratorClosedError,
    InferenceModeError,
    MissingPackageError,
    ReGradError,
    ReGradFileError,
    ReGradHubError,
    ReGradKeyError,
    ReGradTypeError,
    ReGradValueError,
)
from .version import __version__ as __version__

if TYPE_CHECKING:  # what the names below are, for type checkers and editors
    from .bank import GradientBank, Hit
    from .config import ReGradConfig
    from .data import Task
    from .defaults import DEFAULT_EMBEDDER_ID, EMBEDDED_MODEL_ID
    from .modeling import ReGradForCausalLM
    from .serving import BatchingGenerator, GenerationResult
    from .training import ReGradTrainer, ReGradTrainingArguments


# Public name -> the module that defines it, imported when the name is first used.
_LAZY = {
    "BatchingGenerator": "serving",
    "DEFAULT_EMBEDDER_ID": "defaults",
    "EMBEDDED_MODEL_ID": "defaults",
    "GenerationResult": "serving",
    "GradientBank": "bank",
    "Hit": "bank",
    "ReGradConfig": "config",
    "ReGradForCausalLM": "modeling",
    "ReGradTrainer": "training",
    "ReGradTrainingArguments": "training",
    "Task": "data",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    # A sub-package or module (`regrad_hf.bank`, ...), as when `import regrad_hf` imported them all.
    from importlib.util import find_spec

    if not name.startswith("__") and find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _register_config() -> None:
    from . import config  # noqa: F401  (importing it registers ReGradConfig with AutoConfig)


def _register_model() -> None:
    from . import modeling  # noqa: F401  (importing it registers ReGradForCausalLM with AutoModelForCausalLM)


auto_registration.install(_register_config, _register_model)

__all__ = [
    "BatchingGenerator",
    "DEFAULT_EMBEDDER_ID",
    "EMBEDDED_MODEL_ID",
    "BankMismatchError",
    "InferenceModeError",
    "MissingPackageError",
    "BankNotFoundError",
    "EmbeddedModelMissingError",
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

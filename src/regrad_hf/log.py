"""Logging, progress bars and warnings that behave like the rest of the Hugging Face stack.

- The `regrad_hf` logger (and so every `logging.getLogger("regrad_hf.*")`) follows `transformers.logging` verbosity
  (`transformers.logging.set_verbosity_*`, `TRANSFORMERS_VERBOSITY`) until a level is set on `regrad_hf` itself
  (`NOTSET` follows again); it prints to stderr through its own handler, as transformers' loggers do.
- [`progress_bar`]: tqdm bars that honour `transformers.utils.logging.disable_progress_bar()`,
  `huggingface_hub.utils.disable_progress_bars()` (also for the group `"regrad_hf"` alone) and
  `HF_HUB_DISABLE_PROGRESS_BARS=1`.
- [`warn_at_caller`]: `warnings.warn` pointing at the first frame outside regrad-hf, so that a warning names the
  user's line however deep in the library it was raised.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

from huggingface_hub.utils import are_progress_bars_disabled
from transformers.utils import logging as hf_logging

LIBRARY_LOGGER = "regrad_hf"
# Frames a warning must not point at: the package, and contextlib (a context manager's __enter__/__exit__); both as
# imported and resolved, as frames name files by the path they were imported from.
_SKIPPED_FILES = tuple(
    {os.path.dirname(path) + os.sep for path in (__file__, os.path.realpath(__file__))}
    | {contextlib.__file__, os.path.realpath(contextlib.__file__)}
)


class _FollowsTransformersVerbosity(logging.Logger):
    """A logger whose level, while none is set on it (`NOTSET`), is transformers' verbosity.

    `logging` reads a parent's `level` attribute when it resolves a child's effective level, so making that attribute
    live is enough for every `regrad_hf.*` logger to follow. transformers changes its verbosity with `setLevel`, which
    clears every logger's level cache, so nothing stale is kept either.
    """

    _transformers: logging.Logger

    @property
    def level(self) -> int:
        own = self.__dict__.get("_own_level", logging.NOTSET)
        return own or self._transformers.getEffectiveLevel()

    @level.setter
    def level(self, value: int) -> None:
        self.__dict__["_own_level"] = value


def _configure_library_logger() -> None:
    logger = logging.getLogger(LIBRARY_LOGGER)
    if type(logger) is not logging.Logger:  # already done, or a logger class of the application's: left as it is
        return
    # Configure transformers' root logger first (it reads TRANSFORMERS_VERBOSITY), so that reading its level later
    # never takes transformers' lock while `logging` holds its own.
    _FollowsTransformersVerbosity._transformers = hf_logging.get_logger()
    own = logger.__dict__.pop("level", logging.NOTSET)  # a level set before regrad_hf was imported is kept
    logger.__class__ = _FollowsTransformersVerbosity
    logger.level = own
    handler = logging.StreamHandler()  # stderr, as transformers' own handler
    handler.setFormatter(logging.Formatter(f"[{LIBRARY_LOGGER}] %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False  # as transformers: records are printed once, by this handler
    logging.Logger.manager._clear_cache()


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    """A tqdm progress bar (`transformers.utils.logging.tqdm`), shown unless `enabled` is `False` or progress bars
    are disabled through transformers, huggingface_hub (for all or for the group `"regrad_hf"`), or
    `HF_HUB_DISABLE_PROGRESS_BARS=1`.

    Args:
        iterable (*optional*): what to iterate over, as in `tqdm(iterable)`.
        enabled (`bool`, defaults to `True`): the caller's own switch (e.g. `show_progress=False`).
        kwargs: passed to tqdm (`total`, `desc`, `leave`, ...).
    """
    disable = kwargs.pop("disable", False) or not enabled or are_progress_bars_disabled(LIBRARY_LOGGER)
    args = () if iterable is None else (iterable,)
    return hf_logging.tqdm(*args, disable=disable, **kwargs)


def caller_stacklevel() -> int:
    """The `stacklevel` for a `warnings.warn` call made by the caller of this function that points at the first frame
    outside regrad-hf (and outside contextlib's context-manager plumbing)."""
    frame = sys._getframe(2)  # the frame of whoever called our caller
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED_FILES):
        frame = frame.f_back
        level += 1
    return level


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn(message, category)` attributed to the first frame outside regrad-hf: the user's line."""
    warnings.warn(message, category, stacklevel=caller_stacklevel())


_configure_library_logger()  # on import: every module of the package imports this one (through deltas)

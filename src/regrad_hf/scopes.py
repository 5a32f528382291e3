"""State that lives as long as a running function, so that a `KeyboardInterrupt` cannot leave it behind.

A Ctrl-C can land between any two lines, also between setting a marker and the `try` whose `finally` clears it, or
inside that `finally`. A marker that names the frame which set it is valid only while that frame is still on the
stack: one that an interrupt left behind is seen as stale at its next use, ignored and removed.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from types import FrameType

from torch import nn

_SKIPPED = (contextlib.__file__, __file__)


def owner_frame(depth: int = 1) -> FrameType:
    """The frame `depth` levels above the caller, skipping `contextlib`'s (a `@contextmanager` body is entered
    through them): the function whose running scopes the caller's marker."""
    frame = sys._getframe(depth + 1)
    while frame.f_back is not None and frame.f_code.co_filename in _SKIPPED:
        frame = frame.f_back
    return frame


def is_running(frame: FrameType | None) -> bool:
    """Whether `frame` is on the calling thread's stack (its function has not returned or raised)."""
    current = sys._getframe(1)
    while current is not None:
        if current is frame:
            return True
        current = current.f_back
    return False


def remove_forward_hooks(module: nn.Module, matches: Callable[[object], bool]) -> None:
    """Removes the forward hooks of `module` that `matches` (what their `RemovableHandle.remove` does, found by the
    hook itself: a hook registered just before an interrupt has no handle anyone kept). Idempotent."""
    for key in [key for key, hook in list(module._forward_hooks.items()) if matches(hook)]:
        module._forward_hooks.pop(key, None)
        module._forward_hooks_with_kwargs.pop(key, None)
        module._forward_hooks_always_called.pop(key, None)

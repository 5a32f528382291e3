"""When [`ReGradConfig`] and [`ReGradForCausalLM`] join transformers' Auto classes, given that `import regrad_hf`
imports no transformers (so that `regrad --help` stays fast).

An Auto class is reached through transformers only, and it looks a model class up only for a config it has built:

- importing `regrad_hf.config` registers `ReGradConfig` with `AutoConfig`. [`install`] (called by `regrad_hf/__init__`)
  imports it as soon as transformers is imported: at once if it already is, else right after `import transformers`
  finishes (an import hook on `sys.meta_path`, removed once done), or, when that import ran inside the import of a
  `regrad_hf` module (the config needs such modules whole), right after the outermost of those finishes;
- importing `regrad_hf.modeling` registers `ReGradForCausalLM` with `AutoModelForCausalLM`, and the first
  `ReGradConfig` built imports it ([`config_built`]), before an Auto class can look a model class up for that config.

So after a bare `import regrad_hf`, `AutoModelForCausalLM.from_pretrained(regrad_repo)` and
`pipeline(model=regrad_repo)` build a [`ReGradForCausalLM`]. This module imports only the standard library; what to
import is passed in by `regrad_hf/__init__`, the floor above everything.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

_lock = threading.Lock()
_on_first_config: list[Callable[[], None]] = []


def install(register_config: Callable[[], None], register_model: Callable[[], None]) -> None:
    """Calls `register_config` once transformers is imported (see the module's docstring), and `register_model` when
    the first `ReGradConfig` is built."""
    _on_first_config.append(register_model)
    if "transformers" in sys.modules:
        register_config()
    else:
        sys.meta_path.insert(0, _AfterTransformers(register_config))


def config_built() -> None:
    """Called by every `ReGradConfig` built: the first one runs the model's registration."""
    if _on_first_config:
        with _lock:
            callbacks = list(_on_first_config)
            _on_first_config.clear()
        for callback in callbacks:
            callback()


class _AfterTransformers:  # a meta path finder (not importlib.abc's: that import costs `regrad --help` 40 ms)
    """Finds `transformers` and the `regrad_hf` modules as the other finders do, with a loader that calls `register`
    after the module has run, once transformers is imported and no `regrad_hf` module is being imported."""

    def __init__(self, register: Callable[[], None]):
        self.register = register
        self.importing = 0  # regrad_hf modules being imported now
        self.done = False

    def find_spec(self, name, path=None, target=None):
        if name != "transformers" and not name.startswith("regrad_hf."):
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find_spec(name, path, target) if find_spec is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRegister(spec.loader, self, counted=name != "transformers")
                return spec
        return None

    def imported(self) -> None:
        with _lock:
            if self.done or self.importing or "transformers" not in sys.modules:
                return
            self.done = True
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.register()


class _ThenRegister:  # a loader
    """A module's own loader (every other attribute is the loader's), then [`_AfterTransformers.imported`]."""

    def __init__(self, loader, finder: _AfterTransformers, counted: bool):
        self.loader = loader
        self.finder = finder
        self.counted = counted

    def __getattr__(self, name: str):
        if name == "loader":  # not set yet (a copy being made)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        if self.counted:
            with _lock:
                self.finder.importing += 1
        try:
            self.loader.exec_module(module)
        finally:
            if self.counted:
                with _lock:
                    self.finder.importing -= 1
        self.finder.imported()

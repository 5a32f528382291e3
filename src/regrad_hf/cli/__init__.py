"""The `regrad` command: its options (standard library only, so that `regrad --help` imports no torch), its entry
point, and the verbs, which import what they need when they run. `python -m regrad_hf.cli` runs it too."""

from .main import main

__all__ = ["main"]

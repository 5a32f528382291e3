"""What every benchmark writes: its record as indented JSON, with the torch thread count and machine it ran on."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


def write_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Writes `record` plus `torch_threads` and `machine` to `path` (creating its folder)."""
    record = {**record, "torch_threads": torch.get_num_threads(), "machine": platform.machine()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2) + "\n")

"""What the SQuAD benchmarks share: the data file and the held-out questions they evaluate on."""

from __future__ import annotations

import random
from pathlib import Path

from regrad_hf.data import Task, load_squad

ROOT = Path(__file__).resolve().parents[1]
SQUAD = ROOT.parent / "shared" / "data" / "squad_dev_articles_00-39.json"


def held_out_tasks(split: str = "test", count: int = 60, seed: int = 0) -> list[Task]:
    """`count` questions of a SQuAD split (`"test"`: articles 35-39, never seen in meta-training), shuffled with
    `seed`, so that every benchmark asks the same questions."""
    tasks = load_squad(SQUAD, split)
    random.Random(seed).shuffle(tasks)
    return tasks[:count]

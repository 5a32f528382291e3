"""The cheap proxy dev set of meta_train_v3 (issue 29): `dev_synthetic.jsonl` beside this file.

    python training_runs/meta_train_v3/build_dev.py

Invented-fact documents of `regrad_hf.data.synthetic` with a seed of their own (2029; training uses 29), so no dev
entity is a training entity: 80 entities (20 per type), every fact asked once, one line per question with its gold
document (`regrad eval --dataset jsonl` builds the bank from every line's documents and retrieves top-3 over it).
"""

from __future__ import annotations

import json
from pathlib import Path

from regrad_hf.data.synthetic import synthetic_tasks

HERE = Path(__file__).resolve().parent


def main() -> None:
    training = {task.documents[0] for task in synthetic_tasks(6000, seed=29, documents_per_task=1)}
    tasks = synthetic_tasks(80, seed=2029, documents_per_task=1, questions_per_fact=1)
    assert not {task.documents[0] for task in tasks} & training
    with open(HERE / "dev_synthetic.jsonl", "w", encoding="utf-8") as handle:
        for task in tasks:
            handle.write(json.dumps(task.to_dict(), ensure_ascii=False) + "\n")
    print(f"{len(tasks)} questions, {len({t.documents for t in tasks})} documents")


if __name__ == "__main__":
    main()

"""Builds the meta_train_v3 task groups (issue 29): `groups_train.jsonl.gz` beside this file, one `TaskGroup` a line.

    python training_runs/meta_train_v3/build_data.py [--data ../shared/data]

Sources (train material only; the dev and test splits of `regrad_hf.data.task_sets` are never touched):
- SQuAD v1.1 **train**, articles 0-149: each paragraph's questions (up to 10) in one group, padded with the 2
  paragraphs nearest to its questions (all-MiniLM-L6-v2, the bank's embedder) as top-3 retrieval gives;
- TOFU authors 0-119 (the train split): documents of 5 whole facts, their 5 questions in one group, padded the same
  way from the TOFU train pool;
- synthetic invented-fact documents (`regrad_hf.data.synthetic`, seed 29, 6,000 entities, 2 questions per fact): one
  group per entity, padded with 2 same-type hard distractors.
Groups are shuffled with seed 0. The file is committed (gzip), so a resumed run trains on exactly the same groups.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

from regrad_hf.data import load_squad
from regrad_hf.data.grouping import group_by_documents, with_group_distractors
from regrad_hf.data.synthetic import synthetic_tasks
from regrad_hf.data.task_sets import tofu_tasks
from regrad_hf.defaults import load_embedder

HERE = Path(__file__).resolve().parent
MAX_QUESTIONS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parents[2] / "shared" / "data")
    parser.add_argument("--squad-articles", type=int, default=150)
    parser.add_argument("--synthetic-entities", type=int, default=6000)
    parser.add_argument("--output", type=Path, default=HERE / "groups_train.jsonl.gz")
    args = parser.parse_args()
    embedder = load_embedder()
    squad = group_by_documents(load_squad(args.data / "squad_train_v1.1.json.gz", range(args.squad_articles)),
                               MAX_QUESTIONS)  # fmt: skip
    squad = with_group_distractors(squad, 3, embedder)
    tofu = with_group_distractors(group_by_documents(tofu_tasks(args.data / "tofu_qa_authors_000-179.jsonl", "train"),
                                                     MAX_QUESTIONS), 3, embedder)  # fmt: skip
    synthetic = group_by_documents(synthetic_tasks(args.synthetic_entities, seed=29, documents_per_task=3),
                                   MAX_QUESTIONS)  # fmt: skip
    groups = squad + tofu + synthetic
    random.Random(0).shuffle(groups)
    with gzip.open(args.output, "wt", encoding="utf-8") as handle:
        for group in groups:
            handle.write(json.dumps(group.to_dict(), ensure_ascii=False) + "\n")
    counts = {name: (len(g), sum(len(x.tasks) for x in g)) for name, g in
              (("squad", squad), ("tofu", tofu), ("synthetic", synthetic))}  # fmt: skip
    print(json.dumps({"groups_and_pairs": counts, "total_groups": len(groups)}))


if __name__ == "__main__":
    main()

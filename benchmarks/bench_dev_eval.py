"""What selecting checkpoints by generated answers costs: seconds of the trainer's dev evaluation
(`evaluate_injection`, cases no adaptation and ReGrad) with and without greedy generation, on the same dev tasks,
side by side in one run. Prints a table and writes JSON.

    python benchmarks/bench_dev_eval.py --tasks runs/mine/tasks_dev.jsonl

`--tasks` is the dev task file `regrad train --task_set mixed` writes into its output_dir (each task with its
gold and hard-distractor documents, as training sees them).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from regrad_hf import ReGradForCausalLM
from regrad_hf.data import load_jsonl
from regrad_hf.defaults import shipped_learner_path
from regrad_hf.evaluation import evaluate_injection

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", required=True, help="dev tasks (JSONL of regrad_hf.data.Task)")
    parser.add_argument("--learner", default=str(shipped_learner_path()))
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "dev_eval.json"))
    args = parser.parse_args()

    tasks = load_jsonl(args.tasks)
    model = ReGradForCausalLM.from_pretrained(args.learner)
    cases = ("no_adaptation", "regrad")
    rows = {}
    for generate in (False, True):
        start = time.perf_counter()
        results = evaluate_injection(model, tasks, cases=cases, max_new_tokens=args.max_new_tokens, generate=generate)
        seconds = time.perf_counter() - start
        rows["with generation" if generate else "answer NLL only"] = {
            "seconds": seconds,
            "seconds_per_task": seconds / len(tasks),
            "regrad": results["regrad"].as_dict(),
        }
    base = rows["answer NLL only"]["seconds"]
    print(f"{len(tasks)} dev tasks, cases {', '.join(cases)}, {torch.get_num_threads()} threads")
    print("| evaluation | seconds | s / task | ratio | ReGrad answer NLL | ReGrad F1 |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['seconds']:.1f} | {row['seconds_per_task']:.2f} | {row['seconds'] / base:.2f}x | "
            f"{row['regrad']['answer_loss']:.3f} | {row['regrad']['f1']:.3f} |"
        )
    record = {
        "command": "python benchmarks/bench_dev_eval.py --tasks " + args.tasks,
        "tasks": len(tasks),
        "learner": args.learner,
        "results": rows,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
    }
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

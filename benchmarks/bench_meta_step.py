"""Issue 15: what one meta-training step costs on this machine, and what makes it cheaper. Prints a table and
writes benchmarks/results/meta_step.json.

    python benchmarks/bench_meta_step.py [--steps 3] [--documents-per-task 3] [--configs all]

Every configuration runs the real `regrad train` (embedded SmolLM2 + a fresh learner, the issue-15 layout) for
`--steps` steps of 4 tasks of SQuAD v1.1 articles 0-29, each task carrying its paragraph plus distractors up to
`--documents-per-task` (the token count of top-3 training). Time is `Trainer`'s `train_runtime` (model loading
excluded) divided by the steps. Configurations: second order (the recipe) against first order (inner gradient
detached: a warm start), and 1 process x 2 threads against 2 gloo processes x 1 thread (DDP through torchrun,
2 tasks per process), the same with one task per backward (gradient accumulation: same mean gradient, one task's
graph in memory at a time) and 1 process x 1 thread. The machine is shared; numbers are indicative, each run once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from squad_tasks import SQUAD  # noqa: E402

from regrad_hf.data import load_squad  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # name: (processes, threads per process, first order, tasks per backward)
    "second order, 1 process x 2 threads": (1, 2, False, 4),
    "second order, 2 processes x 1 thread": (2, 1, False, 2),
    "second order, 2 processes x 1 thread, 1 task per backward": (2, 1, False, 1),
    "first order, 2 processes x 1 thread": (2, 1, True, 2),
    "second order, 1 process x 1 thread": (1, 1, False, 4),
}


def run(tasks: Path, output: Path, config: tuple[int, int, bool, int], steps: int, dpt: int) -> float:
    """Seconds per meta step of one `regrad train` run (its `train_runtime` / steps)."""
    processes, threads, first_order, per_backward = config
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    command = [sys.executable, *launcher, "-m", "regrad_hf.cli", "train", "--train_format", "jsonl"]
    command += ["--train_file", str(tasks), "--output_dir", str(output), "--max_steps", str(steps)]
    command += ["--per_device_train_batch_size", str(per_backward), "--documents_per_task", str(dpt)]
    command += ["--gradient_accumulation_steps", str(4 // (processes * per_backward))]
    command += ["--first_order", str(first_order).lower(), "--report_to", "none", "--save_strategy", "no"]
    command += ["--use_cpu", "true", "--disable_tqdm", "true", "--dataloader_num_workers", "0"]
    subprocess.run(command, env=env, check=True, capture_output=True)
    record = json.loads((output / "training_record.json").read_text())
    runtime = next(entry["train_runtime"] for entry in record["log_history"] if "train_runtime" in entry)
    return float(runtime) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--documents-per-task", type=int, default=3)
    parser.add_argument("--configs", default="all", help="comma-separated indices into the table, or all")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "meta_step.json")
    args = parser.parse_args()
    names = list(CONFIGS) if args.configs == "all" else [list(CONFIGS)[int(i)] for i in args.configs.split(",")]

    tasks = load_squad(SQUAD, "train")
    random.Random(0).shuffle(tasks)
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        task_file = Path(directory) / "tasks.jsonl"
        task_file.write_text("\n".join(json.dumps(t.to_dict()) for t in tasks[:256]) + "\n")
        for number, name in enumerate(names):
            start = time.perf_counter()
            output = Path(directory) / f"run{number}"
            seconds = run(task_file, output, CONFIGS[name], args.steps, args.documents_per_task)
            results[name] = {"seconds_per_step": round(seconds, 2), "seconds_per_task": round(seconds / 4, 2)}
            print(f"{name}: {seconds:.1f} s/step ({time.perf_counter() - start:.0f} s with loading)", flush=True)

    print(f"\n| configuration | s / step (4 tasks, {args.documents_per_task} documents each) | s / task |")
    print("|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['seconds_per_step']:.1f} | {result['seconds_per_task']:.1f} |")
    payload = {
        "what": "seconds per meta step of regrad train (SmolLM2-135M learner, 4 SQuAD tasks per step)",
        "steps": args.steps,
        "documents_per_task": args.documents_per_task,
        "results": results,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "note": "shared 2-core machine under other jobs' load: indicative, one run per configuration",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()

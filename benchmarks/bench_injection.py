"""Knowledge injection on held-out SQuAD articles: answer loss, EM and F1 of a learner for no-adaptation, raw
gradients, ReGrad and RAG side by side, with the prompt tokens of each. Prints a table and writes JSON.

    python benchmarks/bench_injection.py [--learner DIR] [--tasks 60] [--split test]

Each question is injected with its own gold paragraph (oracle retrieval, k = 1) so that the comparison measures
injection, not retrieval. `raw` and `rag` use the untrained learner start (peft init: B = 0, so `rag` is exactly
the base model) with the same seed as training.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from bench_record import write_record
from squad_tasks import ROOT, held_out_tasks

from regrad_hf import ReGradForCausalLM
from regrad_hf.defaults import shipped_learner_path
from regrad_hf.evaluation import evaluate_injection

CASES = ("no_adaptation", "raw", "regrad", "rag")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learner", default=str(shipped_learner_path()))
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--split", default="test", choices=["dev", "test"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "injection_squad.json"))
    args = parser.parse_args()

    learner = ReGradForCausalLM.from_pretrained(args.learner)
    torch.manual_seed(args.seed)  # the untrained start, initialised as training initialised it
    base = learner.config.base_model_name_or_path
    untrained = ReGradForCausalLM.from_base(base, learner.config).learner_state_dict()

    tasks = held_out_tasks(args.split, args.tasks, args.seed)
    start = time.perf_counter()
    results = evaluate_injection(
        learner, tasks, untrained, cases=CASES, max_new_tokens=args.max_new_tokens, show_progress=True
    )
    seconds = time.perf_counter() - start

    print(f"{len(tasks)} questions of SQuAD {args.split} articles, gold paragraph injected (oracle, k=1)")
    print(f"{'method':<15}{'answer NLL':>12}{'EM':>8}{'F1':>8}{'prompt tokens':>15}")
    for case in CASES:
        r = results[case]
        print(f"{case:<15}{r.answer_loss:>12.3f}{r.exact_match:>8.3f}{r.f1:>8.3f}{r.prompt_tokens:>15.1f}")
    signal = results["no_adaptation"].answer_loss - results["regrad"].answer_loss
    print(f"injection signal (no-adaptation NLL - ReGrad NLL): {signal:.3f} nats")
    record = {
        "learner": os.path.relpath(args.learner, ROOT),
        "split": args.split,
        "tasks": len(tasks),
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "results": {case: results[case].as_dict() for case in CASES},
        "injection_signal": signal,
        "seconds": seconds,
    }
    write_record(args.output, record)


if __name__ == "__main__":
    main()

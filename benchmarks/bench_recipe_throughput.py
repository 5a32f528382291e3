"""Issue 29: question-answer pairs per CPU-hour of meta-training, the old recipe against the amortised ones, measured
side by side in one run. Prints a table and writes benchmarks/results/recipe_throughput.json.

    python benchmarks/bench_recipe_throughput.py [--rounds 3] [--threads 1]

Every recipe trains the shipped learner (embedded SmolLM2-135M, r16 on the MLPs of layers 15-29) on SQuAD v1.1
**train** paragraphs (articles 0-19 of `../shared/data/squad_train_v1.1.json.gz`), each with its 2 nearest other
paragraphs as hard distractors (top-3 retrieval), and times one optimiser step's work (collate, meta-loss, backward):

- old: 4 tasks of one question each, second order (today's `run.sh`: 3 documents per question);
- grouped: 2 task groups of up to 10 questions about one paragraph (one inner step, every question's outer loss);
- grouped, cached: the same groups with theta0 frozen, document gradients computed once each (cache cold at the
  start of the run, as in one pass over new data) and the step sizes trained first order;
- synthetic, grouped: 2 groups of `regrad_hf.data.synthetic` invented-fact documents (45-109 tokens, 2 same-type
  distractors), one group per entity;
- grouped, distilled: the grouped recipe plus the RAG-teacher KL term (`distillation_weight=1`): the teacher (base
  model, the group's 3 documents in the prompt) runs once more per step without a graph, its shared prefix once;
- grouped, bf16: the grouped recipe under bf16 autocast (`ReGradTrainingArguments(bf16=True)`): the learner stays
  float32, the matmuls run in bf16 (fast on CPUs with AMX or AVX512-BF16, slower elsewhere).

`--recipes grouped,grouped-bf16` times a subset (names: old, grouped, cached, synthetic, distilled, grouped-bf16).

Rounds interleave the recipes (ABCD ABCD ...) on fresh items, so machine noise hits them alike. Pairs per hour =
questions trained / seconds x 3600.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from regrad_hf import ReGradForCausalLM
from regrad_hf.data import Task, load_squad
from regrad_hf.data.collator import TaskCollator
from regrad_hf.data.grouping import count_questions, group_by_documents, with_group_distractors
from regrad_hf.data.synthetic import synthetic_tasks
from regrad_hf.defaults import load_embedder, shipped_learner_path
from regrad_hf.prompting import PromptTemplate
from regrad_hf.training.gradient_cache import DocumentGradientCache

ROOT = Path(__file__).resolve().parents[1]
SQUAD_TRAIN = ROOT.parent / "shared" / "data" / "squad_train_v1.1.json.gz"


def squad_groups(embedder, max_questions: int = 10):
    tasks = load_squad(SQUAD_TRAIN, range(0, 20))
    groups = group_by_documents(tasks, max_questions)
    return with_group_distractors(groups, 3, embedder)


def synthetic_groups(count: int):
    """One group per invented entity (its questions), padded with 2 same-type hard distractors, as in the v3 run."""
    return group_by_documents(synthetic_tasks(count, seed=1234, documents_per_task=3), 10)


def step_seconds(model, collator, items, cache=None, distillation_weight: float = 0.0, bf16: bool = False) -> float:
    start = time.perf_counter()
    batch = collator(items)["tasks"]
    summed = None if cache is None else [cache.summed(task["documents"]) for task in batch]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # what Trainer(bf16=True) wraps forward in
        loss = model(meta_tasks=batch, summed_gradients=summed, distillation_weight=distillation_weight).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="1: pairs per CPU-hour are per core-hour")
    parser.add_argument("--recipes", default="old,grouped,cached,synthetic,distilled,grouped-bf16")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "recipe_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = ReGradForCausalLM.from_pretrained(shipped_learner_path())
    model.train()
    collator = TaskCollator(model.tokenizer, max_document_tokens=512, max_answer_tokens=128,
                            prompt=PromptTemplate.from_config(model.config))  # fmt: skip
    embedder = load_embedder(model.config.embedder)
    groups = squad_groups(embedder)
    # The old recipe's items: each group's first question alone, with the group's 3 documents.
    singles = [Task(group.documents, group.tasks[0].question, group.tasks[0].answer, id=group.id) for group in groups]
    synthetic = synthetic_groups(max(12, 2 * (args.rounds + 1)))  # 3+ entities per type for 2 distractors
    cache = DocumentGradientCache(model, max_tokens=512)
    teacher = dataclasses.replace(collator, teacher_prompts=True)
    n = len(groups)
    sixth, third, two_thirds = groups[n // 6 :], groups[n // 3 :], groups[2 * n // 3 :]
    every = {  # key: (name, items per step, items, cache, collator, distillation weight, bf16)
        "old": ("old: 4 single-question tasks, second order", 4, singles, None, collator, 0.0, False),
        "grouped": ("grouped: 2 groups of <= 10 questions, second order", 2, third, None, collator, 0.0, False),
        "cached": (
            "grouped, cached: theta0 frozen, step sizes first order",
            2,
            two_thirds,
            cache,
            collator,
            0.0,
            False,
        ),
        "synthetic": ("synthetic, grouped: 2 groups, second order", 2, synthetic, None, collator, 0.0, False),
        "distilled": ("grouped, distilled: RAG-teacher KL, second order", 2, sixth, None, teacher, 1.0, False),
        # The same groups as "grouped", so the two rows time the same work in two precisions.
        "grouped-bf16": ("grouped, bf16 autocast: second order", 2, third, None, collator, 0.0, True),
    }
    chosen_keys = args.recipes.split(",")
    unknown = sorted(set(chosen_keys) - set(every))
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {', '.join(every)}")
    recipes = {every[key][0]: every[key][1:] for key in every if key in chosen_keys}
    measured = {name: {"seconds": 0.0, "pairs": 0, "steps": 0} for name in recipes}
    for round_ in range(args.rounds + 1):  # round 0 warms up (allocations, kernels) and is not counted
        for name, (per_step, items, recipe_cache, recipe_collator, distillation, bf16) in recipes.items():
            chosen = items[round_ * per_step : (round_ + 1) * per_step]
            seconds = step_seconds(model, recipe_collator, chosen, recipe_cache, distillation, bf16)
            if round_ > 0:
                record = measured[name]
                record["seconds"] += seconds
                record["pairs"] += count_questions(chosen)
                record["steps"] += 1
            print(f"round {round_} {name}: {seconds:.1f} s", flush=True)

    baseline = measured[next(iter(recipes))]
    baseline_rate = baseline["pairs"] / baseline["seconds"] * 3600
    rows = []
    print(f"\n| recipe | s per step | pairs per step | pairs per CPU-hour ({args.threads} threads) | vs first row |")
    print("|---|---|---|---|---|")
    for name, record in measured.items():
        rate = record["pairs"] / record["seconds"] * 3600
        rows.append({"recipe": name, **record, "pairs_per_hour": rate, "ratio_to_first_row": rate / baseline_rate})
        print(f"| {name} | {record['seconds'] / record['steps']:.1f} | {record['pairs'] / record['steps']:.1f} | "
              f"{rate:,.0f} | {rate / baseline_rate:.2f}x |")  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "threads": args.threads, "rounds": args.rounds,
        "cache_hits": cache.hits, "cache_misses": cache.misses, "rows": rows,
    }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()

"""What `regrad eval` gains by running each prompt once: `MethodRunner.answer` (answer NLL, knowledge probe, greedy
answer) with the prompt's KV cache against the same call with the prompt run for every use, interleaved on the same
questions. Prints a table and writes JSON.

    python benchmarks/bench_eval_prompt_cache.py --questions 20 --methods closed_book,rag

Questions: SQuAD dev articles 30-34 (seeded sample), each method's top-3 retrieved paragraphs, the shipped learner and
its prompt. Besides the time it checks what the cache must not change: the greedy answers (same text) and the NLL and
probe scores (largest difference).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from regrad_hf import ReGradForCausalLM
from regrad_hf.defaults import load_embedder, shipped_learner_path
from regrad_hf.evaluation import load_eval_set
from regrad_hf.evaluation import methods as methods_module
from regrad_hf.evaluation.methods import MethodRunner, check_methods
from regrad_hf.evaluation.probe import probe_candidates

HERE = Path(__file__).resolve().parent


def timed_answer(runner: MethodRunner, method: str, question, ids, texts, candidates, cached: bool):
    """`runner.answer` and its wall-clock seconds (probe included), with or without the prompt's KV cache."""
    original = methods_module.prompt_cache
    if not cached:  # each use runs the prompt again, as before the cache
        methods_module.prompt_cache = lambda model, prompt_ids: None
    try:
        start = time.perf_counter()
        answer = runner.answer(method, question.task.question, question.task.answer, ids, texts, candidates)
        return answer, time.perf_counter() - start
    finally:
        methods_module.prompt_cache = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=HERE.parents[1] / "shared" / "data" / "squad_dev_articles_00-39.json"
    )
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--methods", default="closed_book,rag")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "eval_prompt_cache.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    methods = check_methods(args.methods.split(","))
    eval_set = load_eval_set("squad", args.data, split="30-34")
    questions = random.Random(0).sample(eval_set.questions, args.questions)
    model = ReGradForCausalLM.from_pretrained(shipped_learner_path())
    runner = MethodRunner(model)
    embedder = load_embedder(model.config.embedder)
    ids_all = list(eval_set.documents)
    document_embeddings = embedder.encode([eval_set.documents[i] for i in ids_all], normalize_embeddings=True)
    tasks = [question.task for question in eval_set.questions]
    rows = {method: {"cached": [], "uncached": [], "same_answer": 0, "nll_diff": 0.0, "probe_diff": 0.0}
            for method in methods}  # fmt: skip
    for number, question in enumerate(questions):
        query = embedder.encode([question.task.question], normalize_embeddings=True)[0]
        ids = [ids_all[i] for i in (document_embeddings @ query).argsort()[::-1][:3]]
        texts = [eval_set.documents[i] for i in ids]
        candidates = probe_candidates(tasks, eval_set.questions.index(question), 0)
        for method in methods:
            # Alternate which variant goes first, so that neither always runs on a warmer cache.
            order = (True, False) if number % 2 == 0 else (False, True)
            results = {
                cached: timed_answer(runner, method, question, ids, texts, candidates, cached) for cached in order
            }
            row = rows[method]
            row["cached"].append(results[True][1])
            row["uncached"].append(results[False][1])
            with_cache, without = results[True][0], results[False][0]
            row["same_answer"] += with_cache.prediction == without.prediction
            row["nll_diff"] = max(row["nll_diff"], abs(with_cache.answer_nll - without.answer_nll))
            if with_cache.probe_scores is not None:
                difference = max(abs(a - b) for a, b in zip(with_cache.probe_scores, without.probe_scores, strict=True))
                row["probe_diff"] = max(row["probe_diff"], difference)
    report = {"questions": len(questions), "torch_threads": torch.get_num_threads(), "methods": {}}
    print("| method | prompt run once (s / question) | prompt run for each use | ratio | same answers | "
          "max NLL difference | max probe difference |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for method, row in rows.items():
        cached, uncached = sum(row["cached"]) / len(questions), sum(row["uncached"]) / len(questions)
        report["methods"][method] = {"cached_seconds": cached, "uncached_seconds": uncached,
                                     "speedup": uncached / cached, "same_answers": row["same_answer"],
                                     "max_nll_difference": row["nll_diff"],
                                     "max_probe_difference": row["probe_diff"]}  # fmt: skip
        print(f"| {method} | {cached:.2f} | {uncached:.2f} | {uncached / cached:.2f}x | "
              f"{row['same_answer']}/{len(questions)} | {row['nll_diff']:.1e} | {row['probe_diff']:.1e} |")  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

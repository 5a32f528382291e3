"""Re-scores the stored answers of earlier `regrad eval` runs with F1 beyond the question (the metric added after
them), beside their F1 and contained accuracy, with 95 % bootstrap intervals. The answers are not regenerated:
the metrics are functions of the stored predictions, gold answers and questions. Prints a table and writes JSON.

    python benchmarks/rescore_answers.py benchmarks/results/eval_tofu_test_top3_p1.2 \
        benchmarks/results/eval_tofu_test_top3_p1.2_baselines --output benchmarks/results/rescored_tofu_test.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from regrad_hf.evaluation import answer_contained, bootstrap_ci, f1_beyond_question, f1_score
from regrad_hf.evaluation.methods import LABELS


def rescore(results: dict, resamples: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per method: mean and interval of F1, F1 beyond the question and contained, from the stored answers."""
    table = {}
    for method in results["methods"]:
        scores = {"f1": [], "f1_beyond_question": [], "contained": []}
        for question in results["questions"]:
            prediction = question["methods"][method]["prediction"]
            answers = question["answers"]
            scores["f1"].append(f1_score(prediction, answers))
            scores["f1_beyond_question"].append(f1_beyond_question(prediction, answers, question["question"]))
            scores["contained"].append(answer_contained(prediction, answers))
        table[method] = {}
        for name, values in scores.items():
            low, high = bootstrap_ci(values, resamples=resamples, seed=seed)
            table[method][name] = {"mean": sum(values) / len(values), "ci95": [low, high]}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="output folders of regrad eval runs (their results.json)")
    parser.add_argument("--output", required=True, help="JSON path")
    args = parser.parse_args()

    record = {}
    print("| run | method | F1 | F1 beyond the question [95% CI] | contained |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        results = json.loads((Path(run) / "results.json").read_text())
        table = rescore(results)
        record[run] = {"questions": len(results["questions"]), "methods": table}
        for method, row in table.items():
            beyond = row["f1_beyond_question"]
            low, high = beyond["ci95"]
            print(
                f"| {Path(run).name} | {LABELS[method]} | {row['f1']['mean']:.3f} | {beyond['mean']:.3f} "
                f"[{low:.2f}, {high:.2f}] | {row['contained']['mean']:.3f} |"
            )
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Paired comparison of two `regrad eval` runs on the same questions: McNemar's exact test on a 0/1 metric
(`contained` by default) and the mean difference of a continuous one, per question. Prints a table and writes JSON.

    python benchmarks/compare_paired.py A/results.json:regrad B/results.json:regrad [--metric contained]
        [--also probe_accuracy,f1_beyond_question] [--common] [--output out.json]

Each argument is `results.json:method`; the two runs must hold the same question ids (the same --limit and --seed
sample), or, with `--common`, the questions both hold are compared (a run with a smaller --limit and the same --seed
holds the first questions of a larger one's sample).

The exact McNemar p-value is the two-sided binomial test of the discordant pairs (b = A right and B wrong,
c = the reverse) against p = 1/2.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def load(spec: str) -> tuple[str, dict[str, dict]]:
    path, _, method = spec.rpartition(":")
    questions = json.loads(Path(path).read_text())["questions"]
    return f"{Path(path).parent.name}:{method}", {q["id"]: q["methods"][method] for q in questions}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of `b` and `c` discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(0, min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(first: dict[str, dict], second: dict[str, dict], metric: str, also: list[str], common=False) -> dict:
    ids = sorted(set(first) & set(second)) if common else sorted(first)
    if not ids or (not common and set(first) != set(second)):
        raise SystemExit("the two runs hold different questions: use the same --limit and --seed, or --common")
    a = [first[i][metric] >= 0.5 for i in ids]
    b = [second[i][metric] >= 0.5 for i in ids]
    only_first = sum(x and not y for x, y in zip(a, b, strict=True))
    only_second = sum(y and not x for x, y in zip(a, b, strict=True))
    result = {
        "questions": len(ids),
        metric: [sum(a) / len(ids), sum(b) / len(ids)],
        "only_first": only_first,
        "only_second": only_second,
        "mcnemar_p": mcnemar_exact(only_first, only_second),
    }
    for name in also:
        pairs = [(first[i].get(name), second[i].get(name)) for i in ids]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None and x == x and y == y]  # NaN: no probe
        if pairs:
            result[name] = [sum(x for x, _ in pairs) / len(pairs), sum(y for _, y in pairs) / len(pairs), len(pairs)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--metric", default="contained")
    parser.add_argument("--also", default="f1_beyond_question,probe_accuracy,first_token_nll,answer_nll")
    parser.add_argument("--common", action="store_true", help="compare on the questions both runs hold")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    (name_a, first), (name_b, second) = load(args.first), load(args.second)
    compared = compare(first, second, args.metric, args.also.split(","), args.common)
    result = {"first": name_a, "second": name_b, **compared}
    print(f"| | {name_a} | {name_b} |\n|---|---|---|")
    print(f"| {args.metric} (n={result['questions']}) | {result[args.metric][0]:.3f} | {result[args.metric][1]:.3f} |")
    for name in args.also.split(","):
        if name in result:
            print(f"| {name} (n={result[name][2]}) | {result[name][0]:.3f} | {result[name][1]:.3f} |")
    print(f"\ndiscordant: {result['only_first']} only {name_a}, {result['only_second']} only {name_b}; "
          f"McNemar exact p = {result['mcnemar_p']:.4f}")  # fmt: skip
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

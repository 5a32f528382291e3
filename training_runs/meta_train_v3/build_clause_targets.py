"""Builds `groups_train_clause.jsonl.gz`: the run's groups, in the same order, with **clause targets** (issue 29,
lever 4: targets the 135M model can produce, "a sentence is fine").

    python training_runs/meta_train_v3/build_clause_targets.py

A question's target becomes the words of its gold document that lead up to the answer: the sentence holding the
first (case-insensitive, whole-word) occurrence of the answer, from at most `MAX_WORDS_BEFORE` words before the
answer to the answer's end, e.g. "His biggest challenge was logistics" for "logistics". Cutting at the answer keeps
the gold answer inside the 24 tokens an evaluation decodes. A question whose answer is not found in its documents
(TOFU's sentence answers, most of them) keeps its answer; `answers` (what evaluation accepts) is never changed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_WORDS_BEFORE = 12
# A sentence ends at . ! or ? followed by whitespace (abbreviations such as "Dr." split early: the clause is shorter).
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def clause_target(answer: str, documents: list[str]) -> str | None:
    """The clause of the first document that holds `answer`, ending with it, or `None` when none holds it."""
    needle = answer.strip()
    if not needle:
        return None
    # Whole words only: "5" must not match inside "25".
    pattern = re.compile(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", re.IGNORECASE)
    for document in documents:
        for sentence in SENTENCE_END.split(document):
            found = pattern.search(sentence)
            if found is None:
                continue
            before = sentence[: found.start()].split()[-MAX_WORDS_BEFORE:]
            return " ".join([*before, found.group(0)]) if before else None
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=HERE / "groups_train.jsonl.gz")
    parser.add_argument("--output", type=Path, default=HERE / "groups_train_clause.jsonl.gz")
    args = parser.parse_args()
    changed = total = 0
    with gzip.open(args.input, "rt", encoding="utf-8") as source, gzip.open(args.output, "wt", encoding="utf-8") as out:
        for line in source:
            group = json.loads(line)
            for task in group["tasks"]:
                total += 1
                clause = clause_target(task["answer"], task["documents"])
                if clause is not None:
                    task["answer"] = clause
                    changed += 1
            out.write(json.dumps(group, ensure_ascii=False) + "\n")
    print(json.dumps({"questions": total, "clause_targets": changed}))


if __name__ == "__main__":
    main()

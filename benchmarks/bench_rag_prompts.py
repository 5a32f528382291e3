"""The strongest honest RAG at this size: a few prompt templates tried on the SQuAD dev split, RAG and ReGrad side by
side. The best one for RAG (contained accuracy, then F1) is the prompt every method of the fair `regrad eval` runs
shares. Prints a table and writes JSON.

    python benchmarks/bench_rag_prompts.py [--questions 40] [--split 30-34]

Retrieval is top-1 over every paragraph of the split (cosine of the embedder, as the bank searches); ReGrad injects
the retrieved paragraph's gradient (shipped learner). Greedy answers of at most 24 tokens, each template's stop rule.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from regrad_hf import GradientBank, ReGradForCausalLM
from regrad_hf.defaults import load_embedder, shipped_learner_path
from regrad_hf.evaluation import answer_contained, exact_match, f1_score, has_repetition, load_eval_set
from regrad_hf.evaluation.methods import MethodRunner
from regrad_hf.prompting import CONCISE_SYSTEM_PROMPT, PromptTemplate

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent.parent / "shared" / "data" / "squad_dev_articles_00-39.json"
BRIEF = "Reply with only the answer, a few words."
TEMPLATES = {
    "shipped learner's training prompt (no instruction)": PromptTemplate(None, "{context}{question}"),
    "paper instruction, context first": PromptTemplate(CONCISE_SYSTEM_PROMPT),
    "paper instruction, question first": PromptTemplate(
        CONCISE_SYSTEM_PROMPT, "Question: {question}\n\nContext:\n{context}\nAnswer:"
    ),
    "brief instruction, context first": PromptTemplate(BRIEF),
    "brief instruction in the user turn, context first": PromptTemplate(
        None, "{context}Question: {question}\n" + BRIEF + "\nAnswer:"
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learner", default=str(shipped_learner_path()))
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--split", default="30-34")
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="rag,regrad", help="comma-separated, of rag and regrad")
    parser.add_argument("--templates", help="comma-separated template numbers (0-based, default: all)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "rag_prompts_dev.json"))
    args = parser.parse_args()

    methods = args.methods.split(",")
    names = list(TEMPLATES) if args.templates is None else [list(TEMPLATES)[int(i)] for i in args.templates.split(",")]
    eval_set = load_eval_set("squad", args.data, args.split, args.questions, args.seed)
    model = ReGradForCausalLM.from_pretrained(args.learner)
    embedder = load_embedder()
    candidates = list(eval_set.documents)
    vectors = embedder.encode([eval_set.documents[c] for c in candidates], normalize_embeddings=True)
    queries = embedder.encode([q.task.question for q in eval_set.questions], normalize_embeddings=True)
    retrieved = [candidates[int(np.argmax(vectors @ query))] for query in queries]  # exact top-1, as the bank
    recall = sum(doc in q.gold_ids for doc, q in zip(retrieved, eval_set.questions, strict=True)) / len(retrieved)
    if "regrad" in methods:
        needed = list(dict.fromkeys(retrieved))
        bank = GradientBank.build(model, [eval_set.documents[i] for i in needed], ids=needed, embedder_model=embedder)
        model.attach_bank(bank)

    results = {"methods": methods, "split": args.split, "questions": len(retrieved), "recall_at_1": recall}
    results["templates"] = {}
    start = time.perf_counter()
    for name in names:
        template = TEMPLATES[name]
        runner = MethodRunner(model, prompt=template)
        scores = {m: {"exact_match": 0.0, "f1": 0.0, "contained": 0.0, "repetition": 0.0} for m in methods}
        examples = []
        for doc, question in zip(retrieved, eval_set.questions, strict=True):
            task = question.task
            for method in methods:
                answer = runner.answer(method, task.question, task.answer, [doc], [eval_set.documents[doc]])
                scores[method]["exact_match"] += exact_match(answer.prediction, task.answers)
                scores[method]["f1"] += f1_score(answer.prediction, task.answers)
                scores[method]["contained"] += answer_contained(answer.prediction, task.answers)
                scores[method]["repetition"] += has_repetition(answer.prediction)
                if len(examples) < 6:
                    examples.append({"method": method, "question": task.question, "prediction": answer.prediction})
        means = {m: {k: v / len(retrieved) for k, v in s.items()} for m, s in scores.items()}
        results["templates"][name] = {"prompt": asdict(template), "scores": means, "examples": examples}
        print(name, json.dumps(means), flush=True)
    best = max(results["templates"], key=lambda n: tuple(results["templates"][n]["scores"]["rag"][k]
                                                          for k in ("contained", "f1")))  # fmt: skip
    results["best_for_rag"] = best
    results["seconds"] = time.perf_counter() - start
    results["torch_threads"] = torch.get_num_threads()
    Path(args.output).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print("| template | " + " | ".join(f"{m} {k}" for m in methods for k in ("EM", "F1", "contained", "rep.")) + " |")
    print("|---|" + "---|" * 4 * len(methods))
    for name, entry in results["templates"].items():
        metrics = ("exact_match", "f1", "contained", "repetition")
        cells = [f"{entry['scores'][m][k]:.3f}" for m in methods for k in metrics]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"best for RAG: {best}; recall@1 {recall:.3f}; wrote {args.output}")


if __name__ == "__main__":
    main()

"""(c) Per-query latency breakdown of ReGrad and (d) ReGrad against RAG end to end, at k = 3. Prints two tables and
writes benchmarks/results/latency.json.

    python benchmarks/bench_latency.py [--documents 24] [--queries 8] [--rounds 2]

Bank: SQuAD v1.1 dev paragraphs of 80-130 words (articles 35-39), gradients of the shipped learner. For every
question, in one loop so that machine noise hits both methods alike:
- ReGrad: embed the question, search the bank, gather the 3 gradients, apply the step, generate 32 tokens from the
  question alone, undo;
- RAG: embed and search the same way, generate 32 tokens from the 3 documents pasted before the question, on the
  same wrapped model without a step (its LoRA adds the same small cost to both methods).
Generation is greedy with exactly 32 new tokens (`min_new_tokens`), batch 1. Each phase's median over queries and
rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_record import write_record

from regrad_hf import GradientBank, ReGradForCausalLM
from regrad_hf.data.collator import question_prompt
from regrad_hf.defaults import shipped_learner_path

ROOT = Path(__file__).resolve().parents[1]
SQUAD = ROOT.parent / "shared" / "data" / "squad_dev_articles_00-39.json"
NEW_TOKENS = 32


def heldout_documents(count: int) -> tuple[list[str], list[str]]:
    """Paragraphs of 80-130 words and the first question of each."""
    articles = json.loads(SQUAD.read_text())["data"][35:40]
    paragraphs = [p for a in articles for p in a["paragraphs"] if 80 <= len(p["context"].split()) <= 130][:count]
    return [p["context"] for p in paragraphs], [p["qas"][0]["question"] for p in paragraphs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=24)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "latency.json"))
    args = parser.parse_args()

    model = ReGradForCausalLM.from_pretrained(shipped_learner_path())
    # Fixed-length greedy decoding of the prompts as given, as the committed numbers were measured (the learner's
    # own generation config would stop at a newline and ask plain prompts in its template).
    model.generation_config = model.language_model.generation_config
    tokenizer = model.tokenizer
    documents, questions = heldout_documents(args.documents)
    bank = GradientBank.build(model, documents, show_progress=False)
    model.attach_bank(bank)
    generation = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}

    def encode(prompt: str) -> dict[str, torch.Tensor]:
        return tokenizer(prompt, return_tensors="pt", add_special_tokens=False)

    phases: dict[str, list[float]] = {
        name: []
        for name in (
            "embed",
            "retrieve",
            "gather",
            "apply",
            "generate",
            "undo",
            "regrad_total",
            "rag_generate",
            "rag_total",
        )
    }
    prompt_tokens: dict[str, list[int]] = {"regrad": [], "rag": []}
    model.generate(**encode(question_prompt(tokenizer, questions[0])), use_bank=False, **generation)  # warm-up
    for _ in range(args.rounds):
        for question in questions[: args.queries]:
            start = time.perf_counter()
            bank.embedder.encode([question])
            phases["embed"].append(time.perf_counter() - start)  # alone, for the breakdown

            # ReGrad
            start = time.perf_counter()
            hits = bank.search(question, args.k)  # embeds the question, then searches the index
            searched = time.perf_counter()
            stacked = bank.gather([hit.id for hit in hits])
            gathered = time.perf_counter()
            inputs = encode(question_prompt(tokenizer, question))
            step = model._applied(stacked, None)  # the context generate() uses: combine, apply, undo
            step.__enter__()
            applied = time.perf_counter()
            try:
                model.generate(**inputs, use_bank=False, **generation)
                generated = time.perf_counter()
            finally:
                step.__exit__(None, None, None)
            done = time.perf_counter()
            phases["retrieve"].append(searched - start)
            phases["gather"].append(gathered - searched)
            phases["apply"].append(applied - gathered)
            phases["generate"].append(generated - applied)
            phases["undo"].append(done - generated)
            phases["regrad_total"].append(done - start)
            prompt_tokens["regrad"].append(inputs["input_ids"].shape[1])

            # RAG: the same retrieval, documents in the prompt, no adaptation.
            start = time.perf_counter()
            hits = bank.search(question, args.k)
            inputs = encode(question_prompt(tokenizer, question, [hit.text for hit in hits]))
            retrieved = time.perf_counter()
            model.generate(**inputs, use_bank=False, **generation)
            done = time.perf_counter()
            phases["rag_generate"].append(done - retrieved)
            phases["rag_total"].append(done - start)
            prompt_tokens["rag"].append(inputs["input_ids"].shape[1])

    median = {name: statistics.median(values) for name, values in phases.items()}
    overhead = median["regrad_total"] - median["generate"]
    results = {
        "model": model.config.base_model_name_or_path,
        "documents": len(documents),
        "mean_words_per_document": statistics.mean(len(d.split()) for d in documents),
        "k": args.k,
        "new_tokens": NEW_TOKENS,
        "queries": args.queries,
        "rounds": args.rounds,
        "median_seconds": median,
        "retrieve_apply_undo_seconds": overhead,
        "overhead_ratio_vs_generate": overhead / median["generate"],
        "regrad_over_rag_end_to_end": median["regrad_total"] / median["rag_total"],
        "mean_prompt_tokens": {name: statistics.mean(values) for name, values in prompt_tokens.items()},
        "all_seconds": phases,
        "torch": torch.__version__,
    }
    print(f"(c) ReGrad per query, k={args.k}, {NEW_TOKENS} new tokens (median seconds)")
    labels = {"embed": "embed (alone)", "retrieve": "embed + search", "regrad_total": "total"}
    for name in ("embed", "retrieve", "gather", "apply", "generate", "undo", "regrad_total"):
        print(f"  {labels.get(name, name):<14} {median[name]:8.4f}")
    print(f"  retrieve+apply+undo / generate = {results['overhead_ratio_vs_generate']:.3f}")
    print(f"(d) end to end, k={args.k}, documents of {results['mean_words_per_document']:.0f} words on average")
    print(f"  {'method':<8} {'seconds':>8} {'prompt tokens':>14}")
    print(f"  {'ReGrad':<8} {median['regrad_total']:8.3f} {results['mean_prompt_tokens']['regrad']:14.1f}")
    print(f"  {'RAG':<8} {median['rag_total']:8.3f} {results['mean_prompt_tokens']['rag']:14.1f}")
    print(f"  ReGrad / RAG = {results['regrad_over_rag_end_to_end']:.3f}")
    write_record(args.output, results)


if __name__ == "__main__":
    main()

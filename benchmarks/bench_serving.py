"""Serving many client threads: micro-batching (`BatchingGenerator`) against one request at a time (a lock around
`model.generate`). p50/p99 request latency and tokens/s for 1, 4 and 16 client threads, in one run. Prints a table
and writes benchmarks/results/serving.json.

    flock /work/wt/bench.lock python benchmarks/bench_serving.py [--documents 10000] [--clients 1 4 16]

Embedded SmolLM2-135M with the shipped learner, k = 3 (the learner's `top_k_docs`), 16 new tokens greedy
(`min_new_tokens` = 16, so every request yields 16). The bank holds `--documents` synthetic documents (one made-up
fact each); computing 10^4 real gradients on this CPU would take hours, so their gradients are random: each
document gets one of 64 random gradients, each LoRA tensor scaled to the mean norm of real document gradients of
that tensor (measured on 8 of the documents); served requests retrieve different documents all the same. A
[`GradientSource`] that hands the real model's `learner_identity`/`lora_parameters` to the bank, so the bank is a
bank of this learner. Stored as the learner ships (bf16, 3 MB per document), 10^4 documents are 30 GB: more than
this machine's memory, so the bank is built on disk (`--bank-dir`, built once and reused) and gathered from its
memory-mapped shards as a served bank is. (An `int4` bank would be 8 GB, but the bank's quantiser
takes 0.1-0.6 s per document on this CPU, 20-100 minutes for 10^4.)

Each client thread sends its requests back to back (a closed loop): chat prompts asking about distinct random
documents, so the rows of a batch retrieve different documents. `sequential`: each client calls `model.generate`
under one shared lock; `batching`: each client calls `BatchingGenerator.generate` (`--max-batch-size`,
`--max-wait-ms`). Latency is from a client's call to its result; tokens/s is all new tokens over the wall time of
the run. Both ways serve the same requests (which goes first alternates between client counts; every retrieved
document is read once before timing); their tokens are compared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import threading
import time
from pathlib import Path

import torch
from bench_record import write_record
from gradient_sources import LearnerGradients

from regrad_hf import BatchingGenerator, GradientBank, ReGradForCausalLM
from regrad_hf.defaults import shipped_learner_path

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 16
GENERATION = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
SYLLABLES = ["ka", "lo", "mi", "zen", "tor", "vel", "qua", "rin", "bas", "dro", "fi", "nu", "sha", "pel", "gor"]
KINDS = ["harbour town", "violinist", "mineral", "board game", "river", "bicycle", "chemist", "festival", "comet"]
FACTS = ["was founded in", "was first recorded in", "won a prize in", "was described in", "became famous in"]


def synthetic_documents(count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`count` one-fact documents about distinct made-up names, and a question about each."""
    rng = random.Random(seed)
    syllables = max(3, 1 + math.ceil(math.log(max(count, 2), len(SYLLABLES))))  # >= 15x more names than count
    names: dict[str, None] = {}
    while len(names) < count:
        names["".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()] = None
    documents, questions = [], []
    for name in names:
        kind, fact, year = rng.choice(KINDS), rng.choice(FACTS), rng.randrange(1500, 2020)
        documents.append(f"{name} is a {kind} that {fact} {year}, according to the records of {rng.choice(KINDS)}s.")
        questions.append(f"When was {name}, the {kind}, first known?")
    return documents, questions


class SyntheticGradients(LearnerGradients):
    """A [`GradientSource`] of the real learner whose document gradients are random: each document gets one of
    `pool` random gradients (drawing 10^4 x 1.5 M normal values would dominate the build), each LoRA tensor scaled to
    the mean norm of real document gradients of that tensor."""

    def __init__(self, model: ReGradForCausalLM, sample_documents: list[str], pool: int = 64, seed: int = 0):
        super().__init__(model)
        real = model.document_gradients(sample_documents)
        generator = torch.Generator().manual_seed(seed)
        self.pool = {}
        for name, g in real.items():
            random_rows = torch.randn((pool, *g.shape[1:]), generator=generator)
            norms = g.flatten(1).norm(dim=1).mean() / random_rows.flatten(1).norm(dim=1)
            self.pool[name] = random_rows * norms.view(-1, *[1] * (g.dim() - 1))
        self.picks = torch.Generator().manual_seed(seed + 1)

    def document_gradients(self, documents) -> dict[str, torch.Tensor]:
        rows = torch.randint(0, next(iter(self.pool.values())).shape[0], (len(documents),), generator=self.picks)
        return {name: pool.index_select(0, rows) for name, pool in self.pool.items()}


def load_or_build_bank(model: ReGradForCausalLM, documents: list[str], directory: Path) -> tuple[GradientBank, float]:
    start = time.perf_counter()
    if (directory / "bank_config.json").is_file():
        bank = GradientBank.from_pretrained(directory)
        if len(bank) == len(documents):
            return bank, time.perf_counter() - start
    source = SyntheticGradients(model, documents[:8])
    bank = GradientBank.build(
        source, documents, batch_size=64, dtype="bfloat16", output_dir=directory, show_progress=True
    )
    return bank, time.perf_counter() - start


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def serve(way: str, model, prompts: list[list[str]], batching_args: dict) -> dict:
    """Runs every client's prompts back to back, one thread per client; returns latencies, tokens, batch sizes."""
    lock = threading.Lock()
    latencies, tokens = [], {}
    batch_rows: list[int] = []
    generator = BatchingGenerator(model, **batching_args) if way == "batching" else None
    generate = model.generate
    if generator is not None:  # count the rows of each batched call

        def counted(*args, **kwargs):
            batch_rows.append(kwargs["input_ids"].shape[0])
            return generate(*args, **kwargs)

        model.generate = counted

    def alone(prompt: str) -> list[int]:
        inputs = model.tokenizer(prompt, return_tensors="pt")
        with lock:
            return generate(**inputs, **GENERATION)[0, inputs.input_ids.shape[1] :].tolist()

    def client(index: int) -> None:
        for number, prompt in enumerate(prompts[index]):
            start = time.perf_counter()
            new = alone(prompt) if generator is None else generator.generate(prompt, **GENERATION).token_ids
            latencies.append(time.perf_counter() - start)
            tokens[(index, number)] = new

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if generator is not None:
        generator.close()
        del model.generate
    new_tokens = sum(len(t) for t in tokens.values())
    return {
        "latencies": latencies,
        "tokens": tokens,
        "wall_seconds": wall,
        "new_tokens": new_tokens,
        "batch_rows": batch_rows,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=10_000)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, nargs="+", default=[8, 16, 32], help="total requests, per --clients")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--first", choices=["sequential", "batching"], default="batching", help="which way goes first")
    parser.add_argument("--bank-dir", default="/tmp/regrad-bench-serving-bank")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    args = parser.parse_args()
    if len(args.requests) != len(args.clients):
        parser.error("give one --requests total per --clients count")

    model = ReGradForCausalLM.from_pretrained(shipped_learner_path())
    # Fixed-length greedy decoding of the prompts as given, as the committed numbers were measured (the learner's
    # own generation config would stop at a newline and ask plain prompts in its template).
    model.generation_config = model.language_model.generation_config
    documents, questions = synthetic_documents(args.documents)
    bank, bank_seconds = load_or_build_bank(model, documents, Path(args.bank_dir))
    model.attach_bank(bank)
    fingerprint = model.fingerprint()
    k = model.config.top_k_docs
    bank.gather([bank.ids[i] for i in range(0, len(bank), max(1, len(bank) // 64))])  # verify every shard once
    rng = random.Random(1)
    picked = rng.sample(range(len(questions)), sum(args.requests) + 2)
    prompts = [chat_prompt(model.tokenizer, questions[i]) for i in picked]
    # Read every retrieved document once, so that both ways gather from the page cache, not one from the disk.
    for hits in bank.search([questions[i] for i in picked], k):
        bank.gather([hit.id for hit in hits])
    model.generate(**model.tokenizer(prompts[-1], return_tensors="pt"), **GENERATION)  # warm-up
    with BatchingGenerator(model, max_batch_size=2, max_wait_ms=1000) as warm:
        [f.result() for f in [warm.submit(p, **GENERATION) for p in prompts[-2:]]]
    batching_args = {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms}

    results, offset = [], 0
    for clients, total in zip(args.clients, args.requests, strict=True):
        mine = prompts[offset : offset + total]
        offset += total
        per_client = [mine[i::clients] for i in range(clients)]
        entry = {"clients": clients, "requests": total}
        runs = {}
        ways = ("sequential", "batching") if args.first == "sequential" else ("batching", "sequential")
        for way in ways if len(results) % 2 == 0 else reversed(ways):
            runs[way] = run = serve(way, model, per_client, batching_args)
            entry[way] = {
                "p50_latency_seconds": statistics.median(run["latencies"]),
                "p99_latency_seconds": percentile(run["latencies"], 0.99),
                "mean_latency_seconds": statistics.fmean(run["latencies"]),
                "tokens_per_second": run["new_tokens"] / run["wall_seconds"],
                "wall_seconds": run["wall_seconds"],
                "new_tokens": run["new_tokens"],
            }
            if run["batch_rows"]:
                entry[way]["batches"] = len(run["batch_rows"])
                entry[way]["mean_batch_rows"] = statistics.fmean(run["batch_rows"])
                entry[way]["batch_rows"] = run["batch_rows"]
        entry["throughput_ratio"] = entry["batching"]["tokens_per_second"] / entry["sequential"]["tokens_per_second"]
        entry["p50_latency_ratio"] = (
            entry["batching"]["p50_latency_seconds"] / entry["sequential"]["p50_latency_seconds"]
        )
        same = [runs["batching"]["tokens"][key] == value for key, value in runs["sequential"]["tokens"].items()]
        entry["requests_equal_sequential"] = sum(same)
        results.append(entry)
        print(json.dumps({key: value for key, value in entry.items() if key not in ("sequential", "batching")}))

    print(
        f"{'clients':>7} {'requests':>8} | {'seq p50 s':>9} {'seq p99 s':>9} {'seq tok/s':>9} |"
        f" {'batch p50 s':>11} {'batch p99 s':>11} {'batch tok/s':>11} {'mean rows':>9} |"
        f" {'tok/s ratio':>11} {'equal':>7}"
    )
    for e in results:
        s, b = e["sequential"], e["batching"]
        print(
            f"{e['clients']:>7} {e['requests']:>8} | {s['p50_latency_seconds']:>9.2f} {s['p99_latency_seconds']:>9.2f}"
            f" {s['tokens_per_second']:>9.1f} | {b['p50_latency_seconds']:>11.2f} {b['p99_latency_seconds']:>11.2f}"
            f" {b['tokens_per_second']:>11.1f} {b.get('mean_batch_rows', 0):>9.1f} |"
            f" {e['throughput_ratio']:>10.2f}x {e['requests_equal_sequential']:>3}/{e['requests']:<3}"
        )
    report = {
        "model": model.config.base_model_name_or_path,
        "learner": "shipped smollm2-135m-mixed",
        "bank_documents": len(bank),
        "bank_gradients": "synthetic: each document one of 64 random gradients, scaled per LoRA tensor to the mean"
        " norm of real document gradients",
        "bank_dtype": bank.dtype,
        "bank_load_or_build_seconds": bank_seconds,
        "top_k_docs": k,
        "new_tokens_per_request": NEW_TOKENS,
        "batching": batching_args,
        "first_way_at_the_first_client_count": args.first,
        "learner_unchanged_after_all_runs": model.fingerprint() == fingerprint,
        "results": results,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "torch": torch.__version__,
    }
    write_record(args.output, report)


if __name__ == "__main__":
    main()

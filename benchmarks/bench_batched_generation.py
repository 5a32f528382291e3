"""Batched heterogeneous generation: tokens/s when each row of a batch retrieves its own documents, per-row LoRA
tensors in one batched call vs the sequential swap per query, and vs peft's mixed-adapter batches. Prints a table
and writes benchmarks/results/batched_generation.json.

    python benchmarks/bench_batched_generation.py [--documents 24] [--batch-sizes 1 4 8] [--repeats 3]

Embedded SmolLM2-135M with the shipped learner, a bank of SQuAD dev paragraphs (articles 0-39 file), one question
per paragraph for distinct paragraphs, k = 3, 32 new tokens greedy (`min_new_tokens` = 32, so every row yields 32).
Every timing includes retrieval. For each batch size and repeat the three ways run back to back (their order
alternating between repeats), so machine noise hits all of them; medians are reported.

- `sequential`: the path for one row: one `generate` per question, each retrieving, applying its step to the shared
  LoRA tensors, generating and restoring them.
- `batched`: one `generate` on the left-padded batch; rows retrieve different documents, so it runs with per-row
  LoRA tensors (`regrad_hf.adaptation.multi_lora`).
- `plain sequential` / `plain batched`: the base model with the learner's LoRA and no knowledge at all
  (`language_model.generate`, nothing retrieved or applied), one question at a time and as one batch: the ceiling
  that batching itself offers on this machine, against which `batched` is judged.
- `peft`: the same stacked tensors served through peft's `adapter_names=` mixed batches: one named adapter per row
  created on every LoRA layer (`update_layer`, then the tensors copied in), `adapter_names` injected by a forward
  pre-hook as peft's `PeftModel` does, the adapters deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from bench_record import write_record
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from regrad_hf import GradientBank, ReGradForCausalLM, deltas, multi_lora
from regrad_hf.adaptation.learner import ADAPTER_NAME
from regrad_hf.data import load_squad
from regrad_hf.defaults import shipped_learner_path

ROOT = Path(__file__).resolve().parents[1]
SQUAD = ROOT.parent / "shared" / "data" / "squad_dev_articles_00-39.json"
NEW_TOKENS = 32
GENERATION = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}


def paragraphs_and_questions(count: int) -> tuple[list[str], list[str]]:
    """The first `count` distinct SQuAD paragraphs and the first question of each."""
    questions = {}
    for task in load_squad(SQUAD):
        questions.setdefault(task.documents[0], task.question)
        if len(questions) == count:
            break
    return list(questions), list(questions.values())


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def new_tokens(output: torch.Tensor, prompt_length: int) -> list[list[int]]:
    return output[:, prompt_length:].tolist()


def run_sequential(model: ReGradForCausalLM, prompts: list[str], questions: list[str]) -> list[list[int]]:
    rows = []
    for prompt in prompts:
        inputs = model.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        rows += new_tokens(model.generate(**inputs, **GENERATION), inputs.input_ids.shape[1])
    return rows


def run_batched(model: ReGradForCausalLM, prompts: list[str], questions: list[str]) -> list[list[int]]:
    inputs = model.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return new_tokens(model.generate(**inputs, **GENERATION), inputs.input_ids.shape[1])


def run_plain_sequential(model: ReGradForCausalLM, prompts: list[str], questions: list[str]) -> list[list[int]]:
    rows = []
    for prompt in prompts:
        inputs = model.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        rows += new_tokens(model.language_model.generate(**inputs, **GENERATION), inputs.input_ids.shape[1])
    return rows


def run_plain_batched(model: ReGradForCausalLM, prompts: list[str], questions: list[str]) -> list[list[int]]:
    inputs = model.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return new_tokens(model.language_model.generate(**inputs, **GENERATION), inputs.input_ids.shape[1])


def _inject_adapter_names(module, args, kwargs, adapter_names):
    return args, {**kwargs, "adapter_names": adapter_names}


def run_peft(
    model: ReGradForCausalLM, prompts: list[str], questions: list[str], timings: dict | None = None
) -> list[list[int]]:
    """peft's mixed-adapter batch: one adapter per row, created for the call and deleted after it."""
    inputs = model.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    bank, config = model.bank, model.config
    hits = bank.search(questions, config.top_k_docs)
    step_sizes = model.step_sizes()
    row_deltas = [deltas.combine(bank.gather([hit.id for hit in row]), step_sizes, config.gamma) for row in hits]
    row_tensors = multi_lora.stacked_row_tensors(model.lora_parameters(), row_deltas, list(range(len(prompts))))
    start = time.perf_counter()
    layers = {name: m for name, m in model.language_model.named_modules() if isinstance(m, LoraLayer)}
    adapters = [f"row{index}" for index in range(len(prompts))]
    lora_config = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0)
    handles = []
    try:
        with torch.no_grad():
            for name, layer in layers.items():
                for index, adapter in enumerate(adapters):
                    layer.update_layer(adapter, lora_config.r, lora_config.lora_alpha, lora_config)
                    layer.lora_A[adapter].weight.copy_(row_tensors[f"{name}.lora_A.{ADAPTER_NAME}.weight"][index])
                    layer.lora_B[adapter].weight.copy_(row_tensors[f"{name}.lora_B.{ADAPTER_NAME}.weight"][index])
                hook = partial(_inject_adapter_names, adapter_names=adapters)
                handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        created = time.perf_counter()
        output = model.language_model.generate(**inputs, **GENERATION)
        generated = time.perf_counter()
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers.values():
            for adapter in adapters:
                if adapter in layer.lora_A:
                    layer.delete_adapter(adapter)
    if timings is not None:
        timings["create_delete_seconds"] = (created - start) + (time.perf_counter() - generated)
    return new_tokens(output, inputs.input_ids.shape[1])


def timed(run: Callable, *args) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    rows = run(*args)
    return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=24)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "batched_generation.json"))
    args = parser.parse_args()

    model = ReGradForCausalLM.from_pretrained(shipped_learner_path())
    # Fixed-length greedy decoding of the prompts as given, as the committed numbers were measured (the learner's
    # own generation config would stop at a newline and ask plain prompts in its template).
    model.generation_config = model.language_model.generation_config
    model.tokenizer.padding_side = "left"
    documents, questions = paragraphs_and_questions(args.documents)
    start = time.perf_counter()
    model.attach_bank(GradientBank.build(model, documents, show_progress=False))
    fingerprint = model.fingerprint()
    build_seconds = time.perf_counter() - start
    k = min(model.config.top_k_docs, len(documents))
    model.config.top_k_docs = k
    # Questions of evenly spread paragraphs, so that the rows of a batch retrieve different documents.
    largest = max(args.batch_sizes)
    step = max(1, len(questions) // largest)
    picked = questions[::step][:largest]
    prompts = [chat_prompt(model.tokenizer, question) for question in picked]
    run_sequential(model, prompts[:1], picked[:1])  # warm-up
    run_batched(model, prompts[:2], picked[:2])

    ways = {
        "sequential": run_sequential,
        "batched": run_batched,
        "peft": run_peft,
        "plain_sequential": run_plain_sequential,
        "plain_batched": run_plain_batched,
    }
    results = []
    for batch_size in args.batch_sizes:
        batch_prompts, batch_questions = prompts[:batch_size], picked[:batch_size]
        retrieved = {tuple(hit.id for hit in row) for row in model.bank.search(batch_questions, k)}
        seconds = {way: [] for way in ways}
        outputs, peft_overhead = {}, []
        for repeat in range(args.repeats):
            order = list(ways) if repeat % 2 == 0 else list(reversed(ways))
            for way in order:
                if way == "peft" and batch_size == 1:
                    continue  # one row: nothing to mix
                timings = {}
                extra = (timings,) if way == "peft" else ()
                elapsed, rows = timed(ways[way], model, batch_prompts, batch_questions, *extra)
                seconds[way].append(elapsed)
                outputs.setdefault(way, rows)
                if timings:
                    peft_overhead.append(timings["create_delete_seconds"])
        tokens = batch_size * NEW_TOKENS
        entry = {"batch_size": batch_size, "distinct_retrievals": len(retrieved), "new_tokens": tokens}
        for way, values in seconds.items():
            if values:
                entry[f"{way}_seconds"] = statistics.median(values)
                entry[f"{way}_tokens_per_second"] = tokens / statistics.median(values)
                entry[f"{way}_all_seconds"] = values
        entry["batched_speedup_over_sequential"] = entry["sequential_seconds"] / entry["batched_seconds"]
        entry["plain_batching_speedup"] = entry["plain_sequential_seconds"] / entry["plain_batched_seconds"]
        entry["batched_fraction_of_plain_batched_throughput"] = (
            entry["plain_batched_seconds"] / entry["batched_seconds"]
        )
        entry["batched_rows_equal_sequential"] = sum(
            a == b for a, b in zip(outputs["batched"], outputs["sequential"], strict=True)
        )
        if peft_overhead:
            entry["peft_speedup_over_sequential"] = entry["sequential_seconds"] / entry["peft_seconds"]
            entry["peft_adapter_create_delete_seconds"] = statistics.median(peft_overhead)
            entry["peft_rows_equal_batched"] = sum(
                a == b for a, b in zip(outputs["peft"], outputs["batched"], strict=True)
            )
        results.append(entry)
        print(f"batch {batch_size}: {json.dumps({k: v for k, v in entry.items() if not k.endswith('all_seconds')})}")

    header = (
        f"{'batch':>5} {'sequential tok/s':>17} {'batched tok/s':>14} {'speedup':>8} {'rows equal':>11}"
        f" {'peft tok/s':>11} {'peft create+delete s':>21} {'plain seq tok/s':>16} {'plain batch tok/s':>18}"
        f" {'plain speedup':>14}"
    )
    print(header)
    for e in results:
        peft = (
            f" {e['peft_tokens_per_second']:>11.1f} {e['peft_adapter_create_delete_seconds']:>21.2f}"
            if "peft_seconds" in e
            else f" {'-':>11} {'-':>21}"
        )
        print(
            f"{e['batch_size']:>5} {e['sequential_tokens_per_second']:>17.1f} {e['batched_tokens_per_second']:>14.1f}"
            f" {e['batched_speedup_over_sequential']:>7.2f}x"
            f" {e['batched_rows_equal_sequential']:>5}/{e['batch_size']:<5}"
            + peft
            + f" {e['plain_sequential_tokens_per_second']:>16.1f} {e['plain_batched_tokens_per_second']:>18.1f}"
            f" {e['plain_batching_speedup']:>13.2f}x"
        )
    report = {
        "model": model.config.base_model_name_or_path,
        "learner": "shipped smollm2-135m-mixed",
        "bank_documents": len(documents),
        "bank_build_seconds": build_seconds,
        "top_k_docs": k,
        "new_tokens_per_row": NEW_TOKENS,
        "repeats": args.repeats,
        "learner_unchanged_after_all_runs": model.fingerprint() == fingerprint,
        "results": results,
        "torch": torch.__version__,
    }
    write_record(args.output, report)


if __name__ == "__main__":
    main()

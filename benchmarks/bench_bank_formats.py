"""Bank formats side by side: bytes per document, quantisation error, gather latency, and answer loss / EM / F1 on
held-out SQuAD articles (35-39) with the shipped learner, for every bank dtype. Prints a table and writes JSON.

    python benchmarks/bench_bank_formats.py [--tasks 60] [--formats float32 bfloat16 int8 int4 int3 int2]

Every document gradient is computed once, in float32, and stored in a bank of each format; each bank is saved and
loaded back, so gathers read memory-mapped shards and dequantise as in use. Each question is injected with its own
gold paragraph (oracle retrieval, k = 1) through the same evaluation as benchmarks/bench_injection.py, the
gradients coming from the bank under test; greedy answers of `--max-new-tokens` tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from bench_record import write_record
from gradient_sources import LearnerGradients
from squad_tasks import ROOT, held_out_tasks

from regrad_hf import GradientBank, ReGradForCausalLM
from regrad_hf.defaults import load_embedder, shipped_learner_path
from regrad_hf.evaluation import evaluate_injection

FORMATS = ("float32", "bfloat16", "int8", "int4", "int3", "int2")


class PrecomputedGradients(LearnerGradients):
    """A [`GradientSource`] that hands out gradients computed beforehand (so every bank stores the same ones)."""

    def __init__(self, model: ReGradForCausalLM, gradients: Mapping[str, Mapping[str, torch.Tensor]]):
        super().__init__(model)
        self.gradients = gradients

    def document_gradients(self, documents: Sequence[str]) -> dict[str, torch.Tensor]:
        return {
            name: torch.stack([self.gradients[d][name] for d in documents]) for name in self.gradients[documents[0]]
        }


def relative_error(bank: GradientBank, ids: list[str], texts: list[str], exact) -> float:
    """Root-mean-square error of the stored gradients over their root-mean-square value, all documents."""
    error = norm = 0.0
    for doc_id, text in zip(ids, texts, strict=True):
        for name, tensor in bank.gather([doc_id]).items():
            error += (tensor[0].float() - exact[text][name]).pow(2).sum().item()
            norm += exact[text][name].pow(2).sum().item()
    return (error / norm) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learner", default=str(shipped_learner_path()))
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--split", default="test", choices=["dev", "test"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--no-adaptation", action="store_true", help="also evaluate the learner without injection")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "bank_formats.json"))
    args = parser.parse_args()

    model = ReGradForCausalLM.from_pretrained(args.learner)
    model.eval()
    tasks = held_out_tasks(args.split, args.tasks, args.seed)
    texts = list(dict.fromkeys(document for task in tasks for document in task.documents))
    ids = [f"p{index}" for index in range(len(texts))]
    id_of = dict(zip(texts, ids, strict=True))

    start = time.perf_counter()
    exact = {}
    for text in texts:
        gradients = model.document_gradients([text])
        exact[text] = {name: tensor[0].detach().float() for name, tensor in gradients.items()}
    gradient_seconds = time.perf_counter() - start
    print(f"{len(texts)} paragraphs for {len(tasks)} questions; float32 gradients in {gradient_seconds:.1f} s")

    source, embedder = PrecomputedGradients(model, exact), load_embedder()
    values_per_document = sum(tensor.numel() for tensor in next(iter(exact.values())).values())
    reference = {}
    if args.no_adaptation:
        reference = evaluate_injection(model, tasks, cases=("no_adaptation",), max_new_tokens=args.max_new_tokens)
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for dtype in args.formats:
            directory = Path(scratch) / dtype
            built = GradientBank.build(
                source, texts, ids=ids, dtype=dtype, embedder_model=embedder, show_progress=False
            )
            built.save_pretrained(directory)
            bank = GradientBank.from_pretrained(directory, embedder_model=embedder)
            shard_bytes = sum(path.stat().st_size for path in (directory / "gradients").iterdir())
            bank.gather(ids)  # verifies the shards' checksums once
            gather_ms = []
            for doc_id in ids:
                tick = time.perf_counter()
                bank.gather([doc_id])
                gather_ms.append(1000 * (time.perf_counter() - tick))
            error = relative_error(bank, ids, texts, exact)

            model.document_gradients = lambda documents, bank=bank: bank.gather([id_of[d] for d in documents])
            try:
                tick = time.perf_counter()
                result = evaluate_injection(model, tasks, cases=("regrad",), max_new_tokens=args.max_new_tokens)
                seconds = time.perf_counter() - tick
            finally:
                del model.document_gradients  # back to the class's method
            rows[dtype] = {
                "bytes_per_document": bank.bytes_per_document,
                "shard_file_bytes_per_document": shard_bytes / len(texts),
                "bits_per_value": 8 * bank.bytes_per_document / values_per_document,
                "relative_error": error,
                "gather_ms_median": statistics.median(gather_ms),
                **result["regrad"].as_dict(),
                "seconds": seconds,
            }
            print(f"{dtype}: done in {seconds:.0f} s: {json.dumps(rows[dtype])}", flush=True)

    fp32 = rows.get("float32")
    print(f"\n{len(tasks)} questions of SQuAD {args.split} articles, gold paragraph injected (oracle, k=1)")
    header = f"{'format':<10}{'bytes/doc':>11}{'vs fp32':>9}{'bits/value':>11}{'rel. error':>11}{'gather ms':>10}"
    print(header + f"{'answer NLL':>11}{'EM':>7}{'F1':>7}")
    if reference:
        r = reference["no_adaptation"]
        blank = " " * 52
        print(f"{'(none)':<10}{blank}{r.answer_loss:>11.3f}{r.exact_match:>7.3f}{r.f1:>7.3f}")
    for dtype, row in rows.items():
        ratio = row["bytes_per_document"] / fp32["bytes_per_document"] if fp32 else float("nan")
        row["ratio_vs_float32"] = ratio
        print(
            f"{dtype:<10}{row['bytes_per_document']:>11,}{ratio:>9.4f}{row['bits_per_value']:>11.3f}"
            f"{row['relative_error']:>11.4f}{row['gather_ms_median']:>10.2f}{row['answer_loss']:>11.3f}"
            f"{row['exact_match']:>7.3f}{row['f1']:>7.3f}"
        )
    record = {
        "learner": os.path.relpath(args.learner, ROOT),
        "split": args.split,
        "tasks": len(tasks),
        "documents": len(texts),
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "lora_values_per_document": values_per_document,
        "gradient_seconds_float32": gradient_seconds,
        "no_adaptation": reference["no_adaptation"].as_dict() if reference else None,
        "formats": rows,
    }
    write_record(args.output, record)


if __name__ == "__main__":
    main()

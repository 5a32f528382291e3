"""Gather latency: the previous per-row path beside the zero-copy one, per bank format, in one run. Prints a table and
writes benchmarks/results/gather.json.

    python benchmarks/bench_gather.py [--documents 48] [--formats bfloat16 int4] [--k 1 3 8] [--repeats 15]
                                       [--threads N]

The bank has the real layout of the embedded SmolLM2-135M with the shipped learner (its LoRA tensors, names and
shapes), but synthetic gradients: a [`GradientSource`] that delegates the learner's identity and LoRA tensors to the
real model and returns random normal gradients (gather cost does not depend on the values). The bank is saved
(default shard size, one shard) and loaded back, so gathers read memory-mapped shards; every shard is checksummed
before timing. A request gathers `k` random distinct documents.

- `per-row`: the previous version's gather, reimplemented here as the reference: one safetensors `get_slice` per
  document and stored tensor, stacked per tensor, decoded, then its per-document finiteness check.
- `zero-copy`: `GradientBank.gather`: each stored tensor viewed once from the mapping, one `index_select` per
  stored tensor and shard for the request, one decode over all rows, one finiteness check per request.

Both ways run back to back on the same requests (their order alternating between repeats); medians are reported,
and each request's results are checked bit-equal between the two.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from bench_record import write_record
from gradient_sources import LearnerGradients
from safetensors import safe_open

from regrad_hf import GradientBank, ReGradForCausalLM
from regrad_hf.defaults import load_embedder, shipped_learner_path

ROOT = Path(__file__).resolve().parents[1]


class RandomGradients(LearnerGradients):
    """A [`GradientSource`] with the real learner's identity and LoRA layout and random gradients."""

    def __init__(self, model: ReGradForCausalLM, seed: int = 0):
        super().__init__(model)
        self.generator = torch.Generator().manual_seed(seed)

    def document_gradients(self, documents: Sequence[str]) -> dict[str, torch.Tensor]:
        return {
            name: 1e-3 * torch.randn(len(documents), *parameter.shape, generator=self.generator)
            for name, parameter in self.model.lora_parameters().items()
        }


def per_row_gather(bank: GradientBank, readers: Mapping[int, object], ids: Sequence[str]) -> dict[str, torch.Tensor]:
    """The previous `GradientBank.gather` on loaded, checksummed shards: one `get_slice` per document and tensor."""

    def row(doc_id: str, key: str) -> torch.Tensor:
        document = bank.catalogue[doc_id]
        return readers[document.shard].get_slice(key)[document.row : document.row + 1][0]

    gathered = {}
    for name in bank.parameter_shapes:
        keys = [name + suffix for suffix in bank.format.suffixes]
        rows = {key: torch.stack([row(doc_id, key) for doc_id in ids]) for key in keys}
        gathered[name] = bank.store.decode(rows, name)
    bad = set()  # the previous finiteness check: one Python test per document and tensor
    for tensor in gathered.values():
        finite = torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
        bad.update(index for index in range(len(ids)) if not finite[index])
    assert not bad
    return gathered


def timed(function, *args) -> tuple[float, dict[str, torch.Tensor]]:
    tick = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - tick, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learner", default=str(shipped_learner_path()))
    parser.add_argument("--documents", type=int, default=48)
    parser.add_argument("--formats", nargs="+", default=["bfloat16", "int4"])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "gather.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = ReGradForCausalLM.from_pretrained(args.learner)
    source, embedder = RandomGradients(model, args.seed), load_embedder()
    texts = [f"Synthetic document number {index} for the gather benchmark." for index in range(args.documents)]
    ids = [f"d{index}" for index in range(args.documents)]
    picker = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for dtype in args.formats:
            directory = Path(scratch) / dtype
            built = GradientBank.build(
                source, texts, ids=ids, dtype=dtype, embedder_model=embedder, show_progress=False
            )
            built.save_pretrained(directory)
            del built
            bank = GradientBank.from_pretrained(directory, embedder_model=embedder)
            bank.gather(ids)  # checksums every shard once, as a serving bank has
            shards = json.loads((directory / "bank_config.json").read_text())["shards"]
            readers = {i: safe_open(directory / s["file"], framework="pt") for i, s in enumerate(shards)}
            for k in args.k:
                requests = [picker.sample(ids, k) for _ in range(args.repeats)]
                old, new = [], []
                for repeat, request in enumerate(requests):
                    ways = [(old, per_row_gather, (bank, readers, request)), (new, bank.gather, (request,))]
                    results = []
                    for times, function, call in ways if repeat % 2 == 0 else ways[::-1]:
                        seconds, result = timed(function, *call)
                        times.append(seconds)
                        results.append(result)
                    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0]), "results differ"
                row = {
                    "format": dtype,
                    "k": k,
                    "tensors": len(bank.stored_keys),
                    "bytes_per_document": bank.bytes_per_document,
                    "per_row_ms_per_document": 1000 * statistics.median(old) / k,
                    "zero_copy_ms_per_document": 1000 * statistics.median(new) / k,
                }
                row["speedup"] = row["per_row_ms_per_document"] / row["zero_copy_ms_per_document"]
                rows.append(row)
                print(json.dumps(row), flush=True)
            del bank, readers

    print(f"\nGather, {args.documents} documents of the shipped learner's layout, medians of {args.repeats} requests")
    print(
        f"{'format':<10}{'k':>3}{'tensors':>9}{'bytes/doc':>11}{'per-row ms/doc':>16}{'zero-copy ms/doc':>18}{'x':>7}"
    )
    for row in rows:
        print(
            f"{row['format']:<10}{row['k']:>3}{row['tensors']:>9}{row['bytes_per_document']:>11,}"
            f"{row['per_row_ms_per_document']:>16.2f}{row['zero_copy_ms_per_document']:>18.3f}{row['speedup']:>7.1f}"
        )
    record = {
        "documents": args.documents,
        "repeats": args.repeats,
        "gradients": "synthetic (random normal), real learner layout",
        "rows": rows,
    }
    write_record(args.output, record)


if __name__ == "__main__":
    main()

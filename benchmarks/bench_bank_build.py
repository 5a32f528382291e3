"""(a) Bank build speed: batched per-document gradients against one document at a time, and both against the
machine's fp32 matmul rate measured in the same run. Prints a table and writes benchmarks/results/bank_build.json.

    python benchmarks/bench_bank_build.py [--documents 32] [--batch-sizes 1 4 8 16] [--rounds 2]

Documents are SQuAD v1.1 dev paragraphs (articles 35-39). Every mode computes the same documents' gradients with
the same model and thread count; the modes are interleaved round by round so machine noise hits all of them, and
each mode's best round is reported. FLOPs are counted analytically (see `gradient_flops`): only real tokens
count, so padding shows up as lost efficiency.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_record import write_record
from torch import nn

from regrad_hf import ReGradForCausalLM, deltas
from regrad_hf.adaptation.learner import is_lora_parameter_name
from regrad_hf.defaults import shipped_learner_path

ROOT = Path(__file__).resolve().parents[1]
SQUAD = ROOT.parent / "shared" / "data" / "squad_dev_articles_00-39.json"


def heldout_paragraphs(count: int) -> list[str]:
    articles = json.loads(SQUAD.read_text())["data"][35:40]
    return [p["context"] for article in articles for p in article["paragraphs"]][:count]


def matmul_flops_per_second(size: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 rate of a square matmul, the roofline for this dense-matmul workload."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def gradient_flops(model: ReGradForCausalLM, tokens: int) -> float:
    """Matmul FLOPs of one document gradient of `tokens` tokens.

    Forward: 2 x (weights of every linear layer, LM head included) x tokens. Backward: activation gradients through
    the LM head and every decoder layer from the lowest one carrying LoRA (2 x their weights x tokens), plus the
    LoRA weight gradients (2 x LoRA weights x tokens). Attention score FLOPs (small at these lengths) are left out.
    """
    language_model = model.language_model
    lora_names = set(model.lora_parameters())

    def linear_weights(module: nn.Module) -> int:  # base weights only: LoRA factors are counted apart
        return sum(
            m.weight.numel()
            for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and not is_lora_parameter_name(name + ".weight")
        )

    layer_indices = sorted({int(name.split(".layers.")[1].split(".")[0]) for name in lora_names})
    layers = language_model.model.layers
    lora_weights = sum(p.numel() for p in model.lora_parameters().values())
    head = language_model.get_output_embeddings().weight.numel()
    forward = 2 * (linear_weights(language_model) + lora_weights) * tokens
    backward_layers = sum(linear_weights(layers[index]) for index in range(layer_indices[0], len(layers)))
    backward = 2 * (head + backward_layers) * tokens + 2 * 2 * lora_weights * tokens
    return float(forward + backward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "bank_build.json"))
    args = parser.parse_args()

    model = ReGradForCausalLM.from_pretrained(shipped_learner_path())
    tokenizer, lora, max_tokens = model.tokenizer, model.lora_parameters(), model.config.max_document_tokens
    documents = heldout_paragraphs(args.documents)
    tokens = [len(deltas.tokenize_document(tokenizer, d, max_tokens)) for d in documents]
    flops = sum(gradient_flops(model, t) for t in tokens)

    def one_at_a_time() -> dict[str, torch.Tensor]:
        rows = [deltas.document_gradient(model.language_model, tokenizer, lora, d, max_tokens) for d in documents]
        return {name: torch.stack([row[name] for row in rows]) for name in lora}

    modes = {"one at a time": one_at_a_time}
    for size in args.batch_sizes:
        modes[f"batched {size}"] = lambda size=size: deltas.document_gradients(
            model.language_model, tokenizer, lora, documents, max_tokens, batch_size=size
        )

    model.eval()
    deltas.document_gradients(model.language_model, tokenizer, lora, documents[:2], max_tokens)  # warm-up
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    roofline = []
    for _ in range(args.rounds):
        roofline.append(matmul_flops_per_second())
        for mode, run in modes.items():
            start = time.perf_counter()
            outputs[mode] = run()
            seconds[mode].append(time.perf_counter() - start)
    peak = max(roofline)

    reference = outputs["one at a time"]
    rows = []
    for mode in modes:
        best = min(seconds[mode])
        error = max(
            ((outputs[mode][n] - reference[n]).abs().max() / reference[n].abs().max().clamp_min(1e-30)).item()
            for n in lora
        )
        rows.append(
            {
                "mode": mode,
                "seconds": best,
                "documents_per_second": len(documents) / best,
                "seconds_per_document": best / len(documents),
                "gflops_per_second": flops / best / 1e9,
                "fraction_of_matmul_peak": flops / best / peak,
                "speedup_vs_one_at_a_time": min(seconds["one at a time"]) / best,
                "max_relative_difference_vs_one_at_a_time": error,
            }
        )

    print(
        f"{len(documents)} documents, {sum(tokens) / len(tokens):.1f} tokens on average, "
        f"{flops / len(documents) / 1e9:.1f} GFLOP per document; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s "
        f"({torch.get_num_threads()} threads)"
    )
    print(f"{'mode':<15} {'s/doc':>7} {'docs/s':>7} {'GFLOP/s':>8} {'of peak':>8} {'speedup':>8} {'max rel diff':>13}")
    for row in rows:
        print(
            f"{row['mode']:<15} {row['seconds_per_document']:>7.3f} {row['documents_per_second']:>7.2f} "
            f"{row['gflops_per_second']:>8.1f} {row['fraction_of_matmul_peak']:>8.1%} "
            f"{row['speedup_vs_one_at_a_time']:>7.2f}x {row['max_relative_difference_vs_one_at_a_time']:>13.1e}"
        )
    results = {
        "model": model.config.base_model_name_or_path,
        "documents": len(documents),
        "mean_tokens_per_document": sum(tokens) / len(tokens),
        "gflop_per_document": flops / len(documents) / 1e9,
        "matmul_peak_gflops_per_second": peak / 1e9,
        "matmul_rounds_gflops_per_second": [r / 1e9 for r in roofline],
        "rounds": args.rounds,
        "seconds_per_round": seconds,
        "modes": rows,
        "torch": torch.__version__,
    }
    write_record(args.output, results)


if __name__ == "__main__":
    main()

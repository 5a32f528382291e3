"""Core costs on the embedded model: per-document gradient time, bank bytes per document, retrieve/apply/undo
overhead against generation. Prints a table and writes benchmarks/results/core.json.

    python benchmarks/bench_core.py [--documents 16] [--output benchmarks/results/core.json]

Documents are SQuAD v1.1 dev paragraphs from ../shared/data (the first articles), one gradient at a time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from regrad_hf import GradientBank, ReGradForCausalLM

ROOT = Path(__file__).resolve().parents[1]
SQUAD = ROOT.parent / "shared" / "data" / "squad_dev_articles_00-39.json"


def squad_paragraphs(count: int) -> tuple[list[str], list[str]]:
    articles = json.loads(SQUAD.read_text())["data"]
    paragraphs = [p for article in articles for p in article["paragraphs"]][:count]
    return [p["context"] for p in paragraphs], [p["qas"][0]["question"] for p in paragraphs]


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "core.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    model = ReGradForCausalLM.from_base()
    tokenizer = model.tokenizer
    documents, questions = squad_paragraphs(args.documents)
    tokens = [len(tokenizer(d).input_ids) for d in documents]

    model.document_gradients(documents[:1])  # warm-up (allocator, kernels)
    seconds = []
    for document in documents:
        start = time.perf_counter()
        model.document_gradients([document])
        seconds.append(time.perf_counter() - start)

    start = time.perf_counter()
    bank = GradientBank.build(model, documents, show_progress=False)
    build_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as directory:
        bank.save_pretrained(directory)
        total_bytes = directory_bytes(Path(directory))
        gradient_bytes = directory_bytes(Path(directory) / "gradients")
        bank = GradientBank.from_pretrained(directory, embedder_model=bank.embedder)
        model.attach_bank(bank)

        retrieve_apply_undo, generate = [], []
        for question in questions[:8]:
            messages = [{"role": "user", "content": question}]
            inputs = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            start = time.perf_counter()
            with model.retrieved(question, top_k=3):
                entered = time.perf_counter()
                model.language_model.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False)
                generated = time.perf_counter()
            retrieve_apply_undo.append((entered - start) + (time.perf_counter() - generated))
            generate.append(generated - entered)

    lora_parameters = sum(p.numel() for p in model.lora_parameters().values())
    results = {
        "model": model.config.base_model_name_or_path,
        "lora_parameters": lora_parameters,
        "documents": len(documents),
        "mean_tokens_per_document": statistics.mean(tokens),
        "gradient_seconds_per_document_mean": statistics.mean(seconds),
        "gradient_seconds_per_document_median": statistics.median(seconds),
        "gradient_seconds_per_100_tokens": sum(seconds) / sum(tokens) * 100,
        "bank_build_seconds_per_document": build_seconds / len(documents),
        "bank_dtype": bank.dtype,
        "bank_gradient_bytes_per_document": gradient_bytes / len(documents),
        "bank_total_bytes_per_document": total_bytes / len(documents),
        "retrieve_apply_undo_seconds_k3": statistics.median(retrieve_apply_undo),
        "generate_seconds_32_tokens": statistics.median(generate),
        "overhead_ratio": statistics.median(retrieve_apply_undo) / statistics.median(generate),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    width = max(len(key) for key in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

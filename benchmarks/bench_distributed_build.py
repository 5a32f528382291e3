"""Issue 8: `regrad build-bank` with 1 process against 2 processes (torchrun, gloo) on this machine, and the
arithmetic of a 21-million-passage build on 8 GPUs. Prints a table and writes
benchmarks/results/distributed_build.json.

    python benchmarks/bench_distributed_build.py [--documents 64] [--documents-per-shard 4] [--rounds 2]

Every run is the real command on the same documents (SQuAD v1.1 dev paragraphs, articles 35-39) with the shipped
learner and the same shard size, from process start to the published bank, so model loading is included. The
machine has 2 cores, split as: 1 process x 2 threads, 1 process x 1 thread, and 2 processes x 1 thread each
(torchrun's OMP_NUM_THREADS=1). Configurations alternate round by round so that machine noise hits all of them,
and each one's best round is reported. Every run's bank is checked to hold the same documents and gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from regrad_hf import GradientBank, ReGradForCausalLM, deltas
from regrad_hf.bank.quantization import gradient_format
from regrad_hf.defaults import shipped_learner_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bank_build import gradient_flops, heldout_paragraphs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # name: (processes, threads per process)
    "1 process x 2 threads": (1, 2),
    "1 process x 1 thread": (1, 1),
    "2 processes x 1 thread": (2, 1),
}

# The 21M-passage estimate (DPR's Wikipedia split: 21,015,324 passages of 100 words).
PASSAGES = 21_015_324
WORDS_PER_PASSAGE = 100
GPUS = 8
# Sustained dense bf16 throughput assumed per GPU for this small-matmul workload: ~10 % of an H100's 989 TFLOP/s
# dense bf16 peak, i.e. about what a 135M-parameter model with ~130-token sequences reaches; stated, not measured.
ASSUMED_GPU_FLOPS = 100e12


def build(documents: Path, learner: Path, output: Path, processes: int, threads: int, shard_mb: float) -> float:
    """Seconds for one `regrad build-bank` run from process start to the published bank."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    command = [sys.executable, *launcher, "-m", "regrad_hf.cli", "build-bank", "--documents", str(documents)]
    command += ["--learner", str(learner), "--output", str(output), "--max-shard-mb", str(shard_mb), "--overwrite"]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--documents-per-shard", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "distributed_build.json"))
    args = parser.parse_args()

    learner = shipped_learner_path()
    model = ReGradForCausalLM.from_pretrained(learner)
    shapes = {name: tuple(p.shape) for name, p in model.lora_parameters().items()}
    bf16_bytes = gradient_format("bfloat16").bytes_per_document(shapes)
    shard_mb = args.documents_per_shard * bf16_bytes / (1 << 20)
    texts = heldout_paragraphs(args.documents)
    tokens = [len(deltas.tokenize_document(model.tokenizer, t, model.config.max_document_tokens)) for t in texts]
    words = [len(t.split()) for t in texts]

    seconds: dict[str, list[float]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as folder:
        documents = Path(folder) / "documents.jsonl"
        documents.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
        reference = None
        build(documents, learner, Path(folder) / "warm-up", 1, 2, shard_mb)  # file caches, the dequantised model
        for _ in range(args.rounds):
            for name, (processes, threads) in CONFIGS.items():
                output = Path(folder) / "bank"
                seconds[name].append(build(documents, learner, output, processes, threads, shard_mb))
                bank = GradientBank.from_pretrained(output)
                gathered = bank.gather(bank.ids)
                if reference is None:
                    reference = (bank.ids, gathered)
                assert bank.ids == reference[0], "the banks hold other documents"
                difference = max((gathered[n].float() - reference[1][n].float()).abs().max().item() for n in shapes)
                scale = max(reference[1][n].float().abs().max().item() for n in shapes)
                assert difference <= 1e-2 * scale, f"{name}: gradients differ by {difference} (scale {scale})"
                shutil.rmtree(output)

    single = min(seconds["1 process x 2 threads"])
    rows = [
        {
            "configuration": name,
            "processes": CONFIGS[name][0],
            "threads_per_process": CONFIGS[name][1],
            "seconds": min(runs),
            "documents_per_second": args.documents / min(runs),
            "speedup_vs_1_process_2_threads": single / min(runs),
        }
        for name, runs in seconds.items()
    ]

    # 21M passages on 8 GPUs, from this model's FLOPs per token and the int8 format's bytes per document.
    tokens_per_word = sum(tokens) / sum(words)
    passage_tokens = tokens_per_word * WORDS_PER_PASSAGE
    flops_per_passage = gradient_flops(model, round(passage_tokens))
    total_flops = flops_per_passage * PASSAGES
    int8_bytes = gradient_format("int8").bytes_per_document(shapes)
    index_bytes_per_document = 2863  # usearch, 384-d f32 vectors with their HNSW graph: bench_search.py at 10^5
    estimate = {
        "passages": PASSAGES,
        "words_per_passage": WORDS_PER_PASSAGE,
        "tokens_per_word_measured": tokens_per_word,
        "tokens_per_passage": passage_tokens,
        "gflop_per_passage": flops_per_passage / 1e9,
        "total_flop": total_flops,
        "gpus": GPUS,
        "assumed_sustained_flops_per_gpu": ASSUMED_GPU_FLOPS,
        "gpu_hours": total_flops / ASSUMED_GPU_FLOPS / 3600,
        "wall_clock_hours": total_flops / (ASSUMED_GPU_FLOPS * GPUS) / 3600,
        "int8_bytes_per_passage": int8_bytes,
        "bf16_bytes_per_passage": bf16_bytes,
        "int8_gradients_terabytes": int8_bytes * PASSAGES / 1e12,
        "bf16_gradients_terabytes": bf16_bytes * PASSAGES / 1e12,
        "index_gigabytes": index_bytes_per_document * PASSAGES / 1e9,
    }

    print(
        f"{args.documents} documents ({sum(tokens) / len(tokens):.0f} tokens on average), "
        f"{args.documents_per_shard} per shard, best of {args.rounds} rounds, {platform.machine()}"
    )
    print(f"{'configuration':<26} {'seconds':>8} {'docs/s':>8} {'speedup':>8}")
    for row in rows:
        print(
            f"{row['configuration']:<26} {row['seconds']:>8.1f} {row['documents_per_second']:>8.3f} "
            f"{row['speedup_vs_1_process_2_threads']:>7.2f}x"
        )
    print(
        f"\n21M x {WORDS_PER_PASSAGE}-word passages: {passage_tokens:.0f} tokens, {flops_per_passage / 1e9:.1f} GFLOP "
        f"each, {total_flops:.2e} FLOP; at an assumed {ASSUMED_GPU_FLOPS / 1e12:.0f} TFLOP/s per GPU: "
        f"{estimate['gpu_hours']:.1f} GPU-hours, {estimate['wall_clock_hours']:.2f} h on {GPUS} GPUs; int8 "
        f"{int8_bytes / 1e6:.2f} MB/passage = {estimate['int8_gradients_terabytes']:.1f} TB (bf16 "
        f"{estimate['bf16_gradients_terabytes']:.1f} TB), index {estimate['index_gigabytes']:.0f} GB"
    )
    result = {
        "model": model.config.base_model_name_or_path,
        "documents": args.documents,
        "mean_tokens_per_document": sum(tokens) / len(tokens),
        "documents_per_shard": args.documents_per_shard,
        "rounds": args.rounds,
        "seconds_per_round": seconds,
        "configurations": rows,
        "estimate_21m_passages": estimate,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

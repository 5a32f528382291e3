"""Scaling out: `regrad build-bank` under torchrun with 2 CPU processes (gloo) gives the single-process bank, and
`ReGradTrainer` under 2-process DDP keeps both processes' learners identical."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from regrad_hf import GradientBank, ReGradConfig, ReGradForCausalLM

from .conftest import make_tiny_base

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["harbour", "mineral", "bicycle", "board game", "violin", "glacier", "comet", "orchard"]
DOCUMENTS = [
    f"Record {i}: the {TOPICS[i % 8]} of district {i // 8} was catalogued in {1800 + 7 * i}"
    + ", and its keeper wrote a long note about it" * (i % 5)
    + "."
    for i in range(64)
]
DOCUMENTS_PER_SHARD = 8


def run(command: list[str], tmp_path: Path, processes: int = 1) -> subprocess.CompletedProcess:
    """Runs `python -m ...command` alone or under torchrun with `processes` processes, one thread each (gradients
    are bit-for-bit reproducible for a given thread count, so one process gets the threads each of two gets)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "src"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(
        [sys.executable, *launcher, *command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def learner_dir(tokenizer, tmp_path_factory) -> Path:
    """A tiny learner saved like a real one: its base model in a local folder the learner names."""
    root = tmp_path_factory.mktemp("learner")
    base = make_tiny_base(tokenizer)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    config = ReGradConfig(lora_rank=4, init_step_size=0.5, max_document_tokens=64)
    model = ReGradForCausalLM.from_base(str(root / "base"), config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.lora_parameters().items():
            if ".lora_B." in name:
                parameter.normal_(0.0, 0.05)
    model.save_pretrained(root / "learner")
    return root / "learner"


def bank_files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_two_process_build_equals_the_single_process_bank(learner_dir, embedder, tmp_path):
    documents = tmp_path / "docs.jsonl"
    records = [{"id": f"doc{i:02d}", "text": text, "metadata": {"n": i}} for i, text in enumerate(DOCUMENTS)]
    documents.write_text("".join(json.dumps(record) + "\n" for record in records))
    model = ReGradForCausalLM.from_pretrained(learner_dir)
    per_document = sum(p.numel() for p in model.lora_parameters().values()) * 2  # bfloat16
    shard_mb = str(DOCUMENTS_PER_SHARD * per_document / (1 << 20))
    build = ["-m", "regrad_hf.cli", "build-bank", "--documents", str(documents), "--learner", str(learner_dir)]

    run([*build, "--output", "single", "--max-shard-mb", shard_mb], tmp_path)
    multi = run([*build, "--output", "multi", "--max-shard-mb", shard_mb], tmp_path, processes=2)

    # each process computed half of the 8 shards
    for rank in (0, 1):
        assert f"process {rank} of 2: 4 of 8 shards (32 documents) to compute" in multi.stderr, multi.stderr[-3000:]
    single, distributed = tmp_path / "single", tmp_path / "multi"
    config = json.loads((distributed / "bank_config.json").read_text())
    assert len(config["shards"]) == 8 and all(shard["num_documents"] == 8 for shard in config["shards"])
    # the same bank, byte for byte: shards, documents, index, config (and the learner saved beside it)
    assert bank_files(single) == bank_files(distributed)
    assert not list(tmp_path.glob(".*.build"))  # the checkpoint directory is gone

    one, two = GradientBank.from_pretrained(single, embedder), GradientBank.from_pretrained(distributed, embedder)
    assert one.ids == two.ids == [record["id"] for record in records]
    assert all(torch.equal(one.gather(one.ids)[n], two.gather(two.ids)[n]) for n in one.parameter_shapes)
    for query in ("a glacier in district 3", "the comet catalogued in 1841", "violin keeper"):
        assert [(h.id, h.score) for h in one.search(query, k=5)] == [(h.id, h.score) for h in two.search(query, k=5)]
    # and the gradients are the model's
    model.attach_bank(two)
    assert model.bank.document("doc05").metadata == {"n": 5}


def test_ddp_meta_training_keeps_both_processes_learners_identical(tmp_path):
    run([str(ROOT / "tests" / "distributed" / "ddp_meta_train.py"), str(tmp_path)], tmp_path, processes=2)
    first, second = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert first.keys() == second.keys() and first
    # each process trained on other tasks (DistributedSampler): only all-reduced gradients keep them equal
    assert all(torch.equal(first[name], second[name]) for name in first)

    run(
        [str(ROOT / "tests" / "distributed" / "ddp_meta_train.py"), str(tmp_path / "untrained"), "--steps", "0"],
        tmp_path,
    )
    untrained = load_file(tmp_path / "untrained" / "rank0.safetensors")
    assert any(not torch.equal(first[name], untrained[name]) for name in first)  # the steps moved the learner

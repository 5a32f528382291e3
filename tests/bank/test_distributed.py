"""Scaling out: `regrad build-bank` under torchrun with 2 CPU processes (gloo) gives the single-process bank, and
`ReGradTrainer` under 2-process DDP keeps both processes' learners identical."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from usearch.index import Index

from regrad_hf import GradientBank, ReGradConfig, ReGradForCausalLM
from regrad_hf.cli import main as cli_main

from ..conftest import make_tiny_base

ROOT = Path(__file__).resolve().parents[2]
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
    """Every file's bytes, the index's included (the bank inserts its vectors on one thread, so equal banks have
    equal index graphs; bank_config.json records the index's checksum)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


def index_contents(directory: Path) -> dict[int, bytes]:
    index = Index.restore(str(directory / "index.usearch"))
    return {int(key): index.get(key).tobytes() for key in index.keys}


@pytest.fixture(scope="module")
def build_command(learner_dir, tmp_path_factory) -> list[str]:
    """`regrad build-bank` for the 64 documents, 8 per shard, as `python -m` arguments."""
    documents = tmp_path_factory.mktemp("documents") / "docs.jsonl"
    records = [{"id": f"doc{i:02d}", "text": text, "metadata": {"n": i}} for i, text in enumerate(DOCUMENTS)]
    documents.write_text("".join(json.dumps(record) + "\n" for record in records))
    model = ReGradForCausalLM.from_pretrained(learner_dir)
    per_document = sum(p.numel() for p in model.lora_parameters().values()) * 2  # bfloat16
    shard_mb = str(DOCUMENTS_PER_SHARD * per_document / (1 << 20))
    return ["-m", "regrad_hf.cli", "build-bank", "--documents", str(documents), "--learner", str(learner_dir),
            "--max-shard-mb", shard_mb]  # fmt: skip


@pytest.fixture(scope="module")
def single(build_command, tmp_path_factory) -> Path:
    """The bank built by one process."""
    root = tmp_path_factory.mktemp("single")
    run([*build_command, "--output", "bank"], root)
    return root / "bank"


def test_two_process_build_equals_the_single_process_bank(build_command, single, learner_dir, embedder, tmp_path):
    multi = run([*build_command, "--output", "multi"], tmp_path, processes=2)

    # each process computed half of the 8 shards
    for rank in (0, 1):
        assert f"process {rank} of 2: 4 of 8 shards (32 documents) to compute" in multi.stderr, multi.stderr[-3000:]
    distributed = tmp_path / "multi"
    config = json.loads((distributed / "bank_config.json").read_text())
    assert len(config["shards"]) == 8 and all(shard["num_documents"] == 8 for shard in config["shards"])
    # the same bank, byte for byte: shards, documents, config (and the learner saved beside it), the same index
    assert bank_files(single) == bank_files(distributed)
    assert index_contents(single) == index_contents(distributed) and len(index_contents(single)) == 64
    assert not list(tmp_path.glob(".*.build"))  # the checkpoint directory is gone

    one, two = GradientBank.from_pretrained(single, embedder), GradientBank.from_pretrained(distributed, embedder)
    assert one.ids == two.ids == [f"doc{i:02d}" for i in range(64)]
    assert all(torch.equal(one.gather(one.ids)[n], two.gather(two.ids)[n]) for n in one.parameter_shapes)
    for query in ("a glacier in district 3", "the comet catalogued in 1841", "violin keeper", *DOCUMENTS[::7]):
        assert [(h.id, h.score) for h in one.search(query, k=5)] == [(h.id, h.score) for h in two.search(query, k=5)]
    model = ReGradForCausalLM.from_pretrained(learner_dir)
    model.attach_bank(two)  # built for this very learner
    assert model.bank.document("doc05").metadata == {"n": 5}


def test_a_single_process_build_interrupted_resumes_with_two_processes(build_command, single, tmp_path, monkeypatch):
    # three shards finished by one process (one thread, as the processes below), then interrupted
    model = ReGradForCausalLM.from_pretrained(build_command[build_command.index("--learner") + 1])
    compute, calls = model.document_gradients, []

    def failing(documents):
        calls.append(len(documents))
        if len(calls) > 3:
            raise KeyboardInterrupt
        return compute(documents)

    monkeypatch.setattr("regrad_hf.cli.verbs.load_learner", lambda learner, seed: model)
    monkeypatch.setattr(model, "document_gradients", failing)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(build_command[2:] + ["--output", "bank"]) == 130  # the CLI's status for an interruption
    finally:
        torch.set_num_threads(threads)

    resumed = run([*build_command, "--output", "bank"], tmp_path, processes=2)
    assert "resuming the interrupted build" in resumed.stdout and "24 of 64 documents already done" in resumed.stdout
    assert "process 0 of 2: 3 of 8 shards (24 documents) to compute" in resumed.stderr
    assert "process 1 of 2: 2 of 8 shards (16 documents) to compute" in resumed.stderr
    assert bank_files(tmp_path / "bank") == bank_files(single)
    assert index_contents(tmp_path / "bank") == index_contents(single)


@pytest.mark.parametrize("order", ["second", "first"])
def test_ddp_meta_training_keeps_both_processes_learners_identical(tmp_path, order):
    flags = ["--first-order"] if order == "first" else []
    run([str(ROOT / "tests" / "distributed" / "ddp_meta_train.py"), str(tmp_path), *flags], tmp_path, processes=2)
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


def test_a_failure_on_one_process_raises_on_every_process(tmp_path):
    result = run([str(ROOT / "tests" / "distributed" / "one_process_fails.py")], tmp_path, processes=2)
    assert "rank 1 raised ValueError: process 1 cannot read its documents" in result.stdout
    assert "rank 0 raised ReGradError: computing failed on process(es) [1]: see their errors" in result.stdout
    for rank in (0, 1):  # and neither hangs in the collective that follows
        assert f"rank {rank} of 2 got [True, False, True]" in result.stdout


def test_processes_of_a_fresh_machine_convert_the_embedded_model_once_and_whole(tmp_path, monkeypatch):
    monkeypatch.setenv("REGRAD_HF_CACHE", str(tmp_path / "cache"))
    result = run([str(ROOT / "tests" / "distributed" / "embedded_model_first_use.py")], tmp_path, processes=2)
    output = f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    for rank in (0, 1):
        # Searched, not matched at a line's start: the two processes share one pipe, so a line may carry the tail
        # of the other process's unterminated output in front.
        got = re.search(rf"rank {rank} got (.*)", result.stdout)
        assert got is not None, output
        line = got.group(1)
        assert " llama " in line and "'config.json'" in line and "'model.safetensors'" in line, output
    # one conversion, moved into place whole: no staging directory left, only the checkpoint and its lock
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        ".SmolLM2-135M-Instruct-Q4_1-0.1.2.lock",
        "SmolLM2-135M-Instruct-Q4_1-0.1.2",
    ]

"""Resumable bank builds: checkpointed shards, resume after an interruption, refusal to resume something else."""

import json
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from regrad_hf import BankMismatchError, GradientBank, ReGradValueError
from regrad_hf.bank.checkpoint import BUILD_STATE_FILE, finished_shards, resume_message, work_directory
from regrad_hf.cli import main as cli_main

from ..conftest import assert_equal_up_to_rounding, make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
DOCS = [f"Box number {i} holds a marble of weight {7 * i + 3} grams and a brass key." for i in range(6)]
IDS = [f"box{i}" for i in range(6)]
METADATA = [{"n": i} for i in range(6)]
ONE_PER_SHARD = 1  # max_shard_bytes: one document per shard, so every document is a checkpoint


def bank_files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def build(model, embedder, output, documents=DOCS, ids=IDS, **kwargs):
    return GradientBank.build(
        model,
        documents,
        ids=ids,
        embedder_model=embedder,
        show_progress=False,
        output_dir=output,
        max_shard_bytes=ONE_PER_SHARD,
        **kwargs,
    )


class Interrupted(Exception):
    pass


def failing_after(model, monkeypatch, calls: int) -> list[int]:
    """Makes `model.document_gradients` raise on call number `calls + 1`; returns the call counter."""
    compute, counter = model.document_gradients, [0]

    def gradients(documents):
        counter[0] += 1
        if counter[0] > calls:
            raise Interrupted
        return compute(documents)

    monkeypatch.setattr(model, "document_gradients", gradients)
    return counter


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny_model(tokenizer)


@pytest.fixture(scope="module")
def reference(model, embedder, tmp_path_factory):
    """An uninterrupted build, its files."""
    directory = tmp_path_factory.mktemp("reference")
    bank = build(model, embedder, directory, metadata=METADATA)
    return bank, bank_files(directory)


def test_an_interrupted_build_resumes_and_equals_an_uninterrupted_one(model, embedder, tmp_path, reference):
    bank, files = reference
    output = tmp_path / "out"
    metadata = METADATA
    with monkeypatch_context() as monkeypatch:
        failing_after(model, monkeypatch, calls=4)
        with pytest.raises(Interrupted):
            build(model, embedder, output, metadata=metadata)
    assert not output.exists()
    work = work_directory(output.resolve())
    state = json.loads((work / BUILD_STATE_FILE).read_text())
    assert sorted(finished_shards(work, state)) == [0, 1, 2, 3]
    assert resume_message(output).endswith("4 of 6 documents already done")

    with monkeypatch_context() as monkeypatch:
        counter = failing_after(model, monkeypatch, calls=100)
        resumed = build(model, embedder, output, metadata=metadata)
    assert counter[0] == 2  # only the unfinished documents
    assert bank_files(output) == files  # byte for byte, index included
    assert not work_directory(output.resolve()).exists() and resume_message(output) is None
    assert resumed.ids == bank.ids and resumed.document("box3").metadata == {"n": 3}
    assert all(torch.equal(resumed.gather(IDS)[n], bank.gather(IDS)[n]) for n in bank.parameter_shapes)
    assert resumed.search("marble of weight 24 grams", k=1)[0].id == "box3"
    # A build in memory batches all six documents together (not one per shard): the same gradients up to rounding.
    plain = GradientBank.build(model, DOCS, ids=IDS, embedder_model=embedder, show_progress=False)
    for name in bank.parameter_shapes:
        assert_equal_up_to_rounding(resumed.gather(IDS)[name], plain.gather(IDS)[name])


def test_a_damaged_checkpoint_shard_is_recomputed(model, embedder, tmp_path, reference):
    _, files = reference
    output = tmp_path / "out"
    with monkeypatch_context() as monkeypatch:
        failing_after(model, monkeypatch, calls=5)
        with pytest.raises(Interrupted):
            build(model, embedder, output, metadata=METADATA)
    shard = work_directory(output.resolve()) / "gradients" / "shard-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # e.g. a disk that lost the end of the file
    (shard.parent / ".shard-00009.safetensors.x1.tmp").write_bytes(b"left by a killed write")
    build(model, embedder, output, metadata=METADATA)
    assert bank_files(output) == files


def test_resuming_with_another_learner_or_other_documents_is_refused(tokenizer, model, embedder, tmp_path):
    output = tmp_path / "out"
    with monkeypatch_context() as monkeypatch:
        failing_after(model, monkeypatch, calls=3)
        with pytest.raises(Interrupted):
            build(model, embedder, output)
    work = work_directory(output.resolve())
    before = bank_files(work)
    other = make_tiny_model(tokenizer, seed=1)
    with pytest.raises(BankMismatchError, match=r"interrupted build by learner [0-9a-f]{12}.*delete .*\.out\.build"):
        build(other, embedder, output)
    with pytest.raises(ReGradValueError, match="other documents_digest"):
        build(model, embedder, output, documents=[*DOCS[:-1], "A different last document."])
    with pytest.raises(ReGradValueError, match="other dtype"):
        build(model, embedder, output, dtype="int4")
    assert bank_files(work) == before
    build(model, embedder, output)  # the same build still resumes


def test_a_build_killed_after_publishing_is_tidied_up(model, embedder, tmp_path, reference):
    _, files = reference
    output = tmp_path / "out"
    metadata = METADATA
    # what a kill between "swap the work directory in" and "remove the build files" leaves
    with monkeypatch_context() as monkeypatch:
        monkeypatch.setattr("regrad_hf.bank.checkpoint.remove_build_files", lambda directory: None)
        build(model, embedder, output, metadata=metadata)
    assert (output / BUILD_STATE_FILE).is_file() and resume_message(output).endswith("6 of 6 documents already done")
    with monkeypatch_context() as monkeypatch:
        counter = failing_after(model, monkeypatch, calls=0)
        bank = build(model, embedder, output, metadata=metadata)
    assert counter[0] == 0 and len(bank) == 6
    assert bank_files(output) == files


def test_build_bank_command_resumes_with_a_message(model, embedder, tmp_path, monkeypatch, capsys):
    documents = tmp_path / "docs.jsonl"
    documents.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(IDS, DOCS, strict=True)))
    monkeypatch.setattr("regrad_hf.cli.verbs.load_learner", lambda learner, seed: model)
    monkeypatch.setattr("regrad_hf.bank.index.load_embedder", lambda name=None: embedder)
    monkeypatch.setattr(type(model), "save_pretrained", lambda self, path: Path(path).mkdir())
    command = ["build-bank", "--documents", str(documents), "--output", str(tmp_path / "out"), "--max-shard-mb", "0"]
    counter = failing_after(model, monkeypatch, calls=4)
    with pytest.raises(Interrupted):
        cli_main(command)
    counter[0] = -100
    assert cli_main(command) == 0
    assert "resuming the interrupted build" in capsys.readouterr().out
    assert counter[0] == -98 and GradientBank.from_pretrained(tmp_path / "out").ids == IDS


BUILDER = """
import sys
sys.path.insert(0, {root!r})
from transformers import AutoTokenizer
from regrad_hf import GradientBank
from regrad_hf.defaults import embedded_model_path, load_embedder
from tests.conftest import make_tiny_model
from tests.bank.test_bank_build import DOCS, IDS
model, embedder = make_tiny_model(AutoTokenizer.from_pretrained(embedded_model_path())), load_embedder()
print("ready", flush=True)
GradientBank.build(model, DOCS * 5, ids=[f"{{i}}-{{n}}" for n in range(5) for i in IDS], embedder_model=embedder,
                   show_progress=False, output_dir=sys.argv[1], max_shard_bytes=1)
print("done", flush=True)
"""


def kill_at_random(script: str, output: Path, delay: float) -> None:
    """Starts a builder process and SIGKILLs it `delay` seconds after it starts building."""
    builder = subprocess.Popen([sys.executable, "-c", script, str(output)], stdout=subprocess.PIPE, text=True)
    assert builder.stdout.readline().strip() == "ready"
    time.sleep(delay)
    builder.send_signal(signal.SIGKILL)
    builder.wait()


@pytest.mark.slow
def test_build_killed_at_random_points_always_resumes_to_the_same_bank(model, embedder, tmp_path):
    documents, ids = DOCS * 5, [f"{i}-{n}" for n in range(5) for i in IDS]
    start = time.perf_counter()
    build(model, embedder, tmp_path / "reference", documents=documents, ids=ids)
    seconds = time.perf_counter() - start
    expected = bank_files(tmp_path / "reference")
    rng = random.Random(0)
    script = BUILDER.format(root=str(ROOT))
    outputs = [tmp_path / f"out{trial}" for trial in range(20)]
    # five builders at a time (the imports take longer than the build); builds slow down when they run together
    with ThreadPoolExecutor(max_workers=5) as pool:
        list(pool.map(lambda o: kill_at_random(script, o, rng.uniform(0.0, 3 * seconds)), outputs))
    outcomes = {"killed before any shard": 0, "resumed": 0, "finished before the kill": 0, "failures": 0}
    for output in outputs:
        message = resume_message(output)
        if output.exists() and message is None:
            outcomes["finished before the kill"] += 1
        elif message is None or message.split(": ")[-1].startswith("0 of"):
            outcomes["killed before any shard"] += 1
        else:
            outcomes["resumed"] += 1
        bank = build(model, embedder, output, documents=documents, ids=ids)
        outcomes["failures"] += bank_files(output) != expected or work_directory(output.resolve()).exists()
        bank.gather(bank.ids)
    print(f"SIGKILL build trials: {outcomes}")
    assert outcomes["failures"] == 0 and sum(outcomes.values()) == 20
    assert outcomes["resumed"] > 0


def monkeypatch_context():
    return pytest.MonkeyPatch.context()

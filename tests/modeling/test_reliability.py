"""Reliability: crash-safe saves, exact restores under stress, thread safety, bank bookkeeping properties."""

import random
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regrad_hf import GradientBank
from regrad_hf.adaptation.restore import applied_delta

from ..conftest import make_tiny_model, parameter_bytes

SAVER = """
import sys
from regrad_hf import GradientBank
bank = GradientBank.from_pretrained(sys.argv[1])
print("ready", flush=True)
while True:
    bank.save_pretrained(sys.argv[2])
"""

READER = """
import sys
from regrad_hf import GradientBank
print("ready", flush=True)
while True:
    try:
        bank = GradientBank.from_pretrained(sys.argv[1])
        bank.gather(bank.ids)
        print("loaded", len(bank), flush=True)
    except Exception as error:
        print("error", type(error).__name__, error, flush=True)
"""


def _start(script, *arguments):
    process = subprocess.Popen([sys.executable, "-c", script, *map(str, arguments)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


@pytest.mark.slow
def test_two_writers_killed_at_random_points_with_a_reader_lose_nothing(tiny_bank, tmp_path):
    """Two processes save different banks into one directory while a third loads it; the writers are SIGKILLed at
    random points. Every load sees one complete bank, the directory's own files survive, and the next writer
    leaves nothing behind."""
    tiny_bank.save_pretrained(tmp_path / "four")
    tiny_bank.remove("quillon")
    tiny_bank.save_pretrained(tmp_path / "three")
    target = tmp_path / "target"
    GradientBank.from_pretrained(tmp_path / "four").save_pretrained(target)
    (target / "README.md").write_text("my notes")
    rng = random.Random(0)
    reader = _start(READER, target)
    outcomes = {3: 0, 4: 0, "read the interrupted save's backup": 0}
    for _ in range(12):
        writers = [_start(SAVER, tmp_path / source, target) for source in ("four", "three")]
        time.sleep(rng.uniform(0.0, 0.4))
        for writer in rng.sample(writers, 2):
            writer.send_signal(signal.SIGKILL)
            writer.wait()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bank = GradientBank.from_pretrained(target)
        outcomes["read the interrupted save's backup"] += any("was interrupted" in str(w.message) for w in caught)
        assert len(bank) in (3, 4)
        bank.gather(bank.ids)  # every row readable and finite
        outcomes[len(bank)] += 1
        assert (target / "README.md").read_text() == "my notes" or not target.exists()
    reader.send_signal(signal.SIGKILL)
    # the line being written when the reader is killed may be cut short: only lines that end in a newline count
    lines = reader.communicate()[0].split("\n")[:-1]
    loads = [line for line in lines if line.startswith("loaded")]
    unexpected = [line for line in lines if line not in ("loaded 3", "loaded 4")]
    assert loads and not unexpected, unexpected[:3]
    GradientBank.from_pretrained(tmp_path / "three").save_pretrained(target)  # a writer repairs and tidies
    assert (target / "README.md").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".target")) == [".target.lock"]
    print(f"SIGKILL trials: {outcomes}; reader: {len(loads)} loads, all complete")


def test_thousand_random_apply_undo_cycles_restore_every_byte(tiny_model):
    lora = tiny_model.lora_parameters()
    before = parameter_bytes(tiny_model)
    rng = torch.Generator().manual_seed(0)
    failures = 0
    for cycle in range(1000):
        delta = {
            n: torch.randn(p.shape, generator=rng) * 10 ** float(torch.randint(-8, 2, (1,), generator=rng))
            for n, p in lora.items()
        }
        raise_inside = cycle % 3 == 0
        try:
            with applied_delta(lora, delta):
                if cycle % 7 == 0:  # nested
                    with applied_delta(lora, delta):
                        pass
                if raise_inside:
                    raise RuntimeError("inside")
        except RuntimeError:
            failures += 1
        assert parameter_bytes(tiny_model) == before, f"cycle {cycle}"
    assert failures == 334


def test_concurrent_generate_calls_equal_sequential_ones(tiny_model, tiny_bank, tokenizer):
    tiny_model.attach_bank(tiny_bank)
    questions = ["capital of Zorbia?", "Which mineral did Halvorsen find?", "Velomar frame?", "swans board game?"]
    inputs = [tokenizer(q, return_tensors="pt") for q in questions]
    sequential = [tiny_model.generate(**x, max_new_tokens=8, do_sample=False) for x in inputs]
    before = parameter_bytes(tiny_model)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            futures = [pool.submit(tiny_model.generate, **x, max_new_tokens=8, do_sample=False) for x in inputs]
            assert all(torch.equal(f.result(), s) for f, s in zip(futures, sequential, strict=True))
    assert parameter_bytes(tiny_model) == before


DOC_POOL = [
    f"Box number {i} holds a {color} marble and a {item}."
    for i, (color, item) in enumerate(
        [("red", "key"), ("blue", "coin"), ("green", "stamp"), ("black", "ring"), ("white", "shell"), ("gold", "pin")]
    )
]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=st.lists(st.tuples(st.booleans(), st.integers(0, len(DOC_POOL) - 1)), min_size=1, max_size=8))
def test_add_remove_search_stay_consistent(tokenizer, embedder, operations):
    model = make_tiny_model(tokenizer)
    bank = GradientBank.build(model, [DOC_POOL[0]], ids=["d0"], embedder_model=embedder, show_progress=False)
    expected = {"d0": DOC_POOL[0]}
    for is_add, index in operations:
        doc_id = f"d{index}"
        if is_add and doc_id not in expected:
            bank.add(model, [DOC_POOL[index]], ids=[doc_id], show_progress=False)
            expected[doc_id] = DOC_POOL[index]
        elif not is_add and doc_id in expected and len(expected) > 1:
            bank.remove(doc_id)
            del expected[doc_id]
    assert len(bank) == len(expected) and sorted(bank.ids) == sorted(expected)
    assert {hit.id for hit in bank.search("a marble in a box", k=len(bank))} == set(expected)
    for doc_id, text in expected.items():
        assert bank.search(text, k=1)[0].id == doc_id
        stored = bank.gather([doc_id])
        fresh = model.document_gradients([text])
        assert all(torch.equal(stored[n][0], fresh[n][0].to(torch.bfloat16)) for n in stored)

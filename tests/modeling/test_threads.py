"""The thread contract of `ReGradForCausalLM`: one model shared by many threads, each seeing the un-adapted learner
except inside its own adaptation.

Eight threads start together (a barrier) and each runs one of eight operations that read or write the learner's
tensors: a generate that swaps the shared LoRA tensors, a heterogeneous (per-row) generate, `retrieved`,
`knowledge`, `GradientBank.build`, `save_pretrained`, `attach_bank` and `fingerprint`. Every result must equal the
same operation run alone: greedy tokens, gradient bytes and saved file bytes bit for bit, and no exception.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from regrad_hf import GradientBank

from ..conftest import DOCUMENTS, IDS, parameter_bytes

GREEDY = {"max_new_tokens": 8, "do_sample": False}
ROUNDS = 2
REPEATS = 4
THREADS = 8


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {
        name: t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for name, t in tensors.items()
    }


def directory_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


@pytest.fixture
def operations(tiny_model, tiny_bank, tokenizer, embedder, tmp_path):
    """name -> a function of a per-call directory returning a comparable result."""
    tiny_model.attach_bank(tiny_bank)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    single = tokenizer("What is the capital of Zorbia?", return_tensors="pt")
    rows = tokenizer(
        ["Which mineral did Halvorsen discover?", "Tell me about the Velomar bicycle frame"],
        return_tensors="pt",
        padding=True,
    )
    plain = tokenizer("Tell me a story about swans.", return_tensors="pt")
    tokenizer.padding_side = padding_side

    def generate_shared(_):
        return tiny_model.generate(**single, **GREEDY)  # one delta for the batch: the shared LoRA tensors swap

    def generate_rows(_):
        return tiny_model.generate(**rows, **GREEDY)  # rows retrieve different documents: per-row LoRA tensors

    def retrieved(_):
        with tiny_model.retrieved("Who discovered halvorite?", top_k=2) as hits:
            return [hit.id for hit in hits], tiny_model.generate(**plain, **GREEDY, use_bank=False)

    def knowledge(_):
        with tiny_model.knowledge([DOCUMENTS[3]], gamma=2.0):
            return tiny_model.generate(**plain, **GREEDY, use_bank=False)

    def build(_):
        bank = GradientBank.build(
            tiny_model, DOCUMENTS[:2], ids=IDS[:2], embedder_model=embedder, show_progress=False, batch_size=2
        )
        return bank.fingerprint, tensor_bytes(bank.gather(IDS[:2]))

    def save(directory):
        tiny_model.save_pretrained(directory)
        return directory_bytes(directory)

    def attach(_):
        tiny_model.attach_bank(tiny_bank)  # raises BankMismatchError if it read another thread's adapted tensors
        return True

    def fingerprint(_):
        return tiny_model.learner_identity(), tiny_model.fingerprint()

    return [generate_shared, generate_rows, retrieved, knowledge, build, save, attach, fingerprint]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_eight_threads_mixing_every_learner_operation_see_the_unadapted_learner(tiny_model, operations, tmp_path):
    assert len(operations) == THREADS
    sequential = {op.__name__: op(tmp_path / f"alone-{op.__name__}") for op in operations}
    before = parameter_bytes(tiny_model)
    failures: list[str] = []

    def worker(thread: int, barrier: threading.Barrier, round_: int) -> None:
        barrier.wait()
        for repeat in range(REPEATS):  # back to back, so that fast operations also meet other threads' slow ones
            op = operations[(thread + round_ + repeat) % THREADS]  # every thread runs every operation
            try:
                result = op(tmp_path / f"round{round_}-thread{thread}-{repeat}")
            except Exception as error:  # noqa: BLE001 - any exception breaks the contract; report which
                failures.append(f"round {round_} {op.__name__}: {type(error).__name__}: {error}")
                continue
            if not same(result, sequential[op.__name__]):
                failures.append(f"round {round_} {op.__name__}: differs from its sequential result")

    for round_ in range(ROUNDS):
        barrier = threading.Barrier(THREADS)
        threads = [threading.Thread(target=worker, args=(t, barrier, round_)) for t in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads), "a thread hangs (deadlock?)"
    assert not failures, f"{len(failures)} of {ROUNDS * REPEATS * THREADS} calls broke the contract:\n" + "\n".join(
        failures
    )
    assert parameter_bytes(tiny_model) == before
    assert not any(module._forward_hooks for module in tiny_model.modules())


@pytest.mark.parametrize("name", ["build", "save", "attach", "fingerprint"])
def test_an_operation_started_during_another_threads_adaptation_sees_the_unadapted_learner(
    tiny_model, operations, tmp_path, name
):
    """Deterministic: thread A holds an adaptation open while thread B runs the operation."""
    op = next(op for op in operations if op.__name__ == name)
    alone = op(tmp_path / "alone")
    inside, release, outcome = threading.Event(), threading.Event(), {}

    def adapt():
        with tiny_model.knowledge([DOCUMENTS[2]], gamma=3.0):
            inside.set()
            release.wait(timeout=60)

    def run():
        try:
            outcome["result"] = op(tmp_path / "during")
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = error

    adapter = threading.Thread(target=adapt)
    adapter.start()
    assert inside.wait(timeout=60)
    runner = threading.Thread(target=run)
    runner.start()
    runner.join(timeout=0.5)  # it waits for the adaptation to end (or, unguarded, reads the adapted tensors)
    release.set()
    adapter.join(timeout=60)
    runner.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    assert same(outcome["result"], alone)


def test_inside_its_own_adaptation_a_thread_still_reads_the_unadapted_learner(tiny_model, tiny_bank, tmp_path):
    tiny_model.attach_bank(tiny_bank)
    fingerprint, state = tiny_model.fingerprint(), tensor_bytes(tiny_model.learner_state_dict())
    gradients = tensor_bytes(tiny_model.document_gradients(DOCUMENTS[:2]))
    tiny_model.save_pretrained(tmp_path / "outside")
    before = parameter_bytes(tiny_model)
    with tiny_model.retrieved("capital of Zorbia"), tiny_model.knowledge([DOCUMENTS[1]]):
        adapted = parameter_bytes(tiny_model)
        assert adapted != before
        assert tiny_model.fingerprint() == fingerprint
        assert tensor_bytes(tiny_model.learner_state_dict()) == state
        tiny_model.attach_bank(tiny_bank)  # no BankMismatchError
        tiny_model.save_pretrained(tmp_path / "inside")
        # taken at the un-adapted tensors, as a bank's are; the adapted ones are back afterwards
        assert tensor_bytes(tiny_model.document_gradients(DOCUMENTS[:2])) == gradients
        assert parameter_bytes(tiny_model) == adapted
    assert directory_bytes(tmp_path / "inside") == directory_bytes(tmp_path / "outside")
    assert parameter_bytes(tiny_model) == before


def test_a_gradient_capture_ignores_other_threads_forwards(tiny_model, tokenizer):
    from regrad_hf.adaptation.deltas import _linear_modules_of, documents_lm_loss
    from regrad_hf.adaptation.per_sample import LinearWeightGradients

    lm = tiny_model.language_model
    modules = _linear_modules_of(lm, tiny_model.lora_parameters())
    ids = tokenizer(DOCUMENTS[:1], return_tensors="pt").input_ids
    other = tokenizer(DOCUMENTS[1:3], return_tensors="pt", padding=True)

    def captured(interleave: bool) -> dict[str, bytes]:
        with LinearWeightGradients(modules) as capture:
            if interleave:  # another thread's forward (another batch size) while the capture is open
                thread = threading.Thread(target=lambda: lm(**other))
                thread.start()
                thread.join()
            loss = documents_lm_loss(lm, ids, torch.ones_like(ids))
        return tensor_bytes(capture.gradients(loss))

    assert captured(interleave=True) == captured(interleave=False)

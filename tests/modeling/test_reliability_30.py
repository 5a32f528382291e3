"""Reliability under no_grad / inference_mode, full disks and bad paths, data limits at entry, and hostile
callbacks of the batching server (issue 30)."""

from __future__ import annotations

import errno
import inspect
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from regrad_hf import (
    BatchingGenerator,
    GradientBank,
    InferenceModeError,
    ReGradError,
    ReGradFileError,
    ReGradForCausalLM,
    ReGradTypeError,
)
from regrad_hf import files as regrad_files
from regrad_hf.adaptation import restore as restore_module
from regrad_hf.errors import ReGradValueError

from ..conftest import DOCUMENTS, IDS, make_tiny_base, make_tiny_model, parameter_bytes

# ------------------------------------------------------------------ 1. no_grad / inference_mode

CALLER_MODES = [torch.no_grad, torch.inference_mode]


@pytest.mark.parametrize("mode", CALLER_MODES, ids=["no_grad", "inference_mode"])
def test_document_gradients_are_computed_under_the_callers_no_grad_or_inference_mode(tiny_model, embedder, mode):
    expected = tiny_model.document_gradients(DOCUMENTS[:2])
    with mode():
        stacked = tiny_model.document_gradients(DOCUMENTS[:2])
        bank = GradientBank.build(tiny_model, DOCUMENTS[:2], ids=IDS[:2], embedder_model=embedder, show_progress=False)
        bank.add(tiny_model, DOCUMENTS[2:3], ids=IDS[2:3])
    assert sorted(bank.ids) == sorted(IDS[:3])
    for name, gradient in expected.items():
        assert torch.equal(stacked[name], gradient)
        assert not stacked[name].is_inference()


@pytest.mark.parametrize("mode", CALLER_MODES, ids=["no_grad", "inference_mode"])
def test_knowledge_and_export_work_under_the_callers_no_grad_or_inference_mode(tiny_model, tokenizer, tmp_path, mode):
    before = parameter_bytes(tiny_model)
    inputs = tokenizer("The capital of Zorbia is", return_tensors="pt")
    with tiny_model.knowledge(DOCUMENTS[:1]):
        expected = tiny_model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with mode():
        with tiny_model.knowledge(DOCUMENTS[:1]):
            tokens = tiny_model.generate(**inputs, max_new_tokens=4, do_sample=False)
        tiny_model.export_adapter(tmp_path / "adapter", documents=DOCUMENTS[:1])
    tiny_model.export_adapter(tmp_path / "plain", documents=DOCUMENTS[:1])
    assert torch.equal(tokens, expected)
    assert parameter_bytes(tiny_model) == before
    written = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    assert written == (tmp_path / "plain" / "adapter_model.safetensors").read_bytes()


def test_a_model_built_under_inference_mode_refuses_document_gradients_with_one_typed_error(tokenizer, embedder):
    with torch.inference_mode():
        model = make_tiny_model(tokenizer)
        with pytest.raises(InferenceModeError, match="inference_mode"):
            model.document_gradients(DOCUMENTS[:1])
        with pytest.raises(InferenceModeError), model.knowledge(DOCUMENTS[:1]):
            pass
        with pytest.raises(InferenceModeError):
            GradientBank.build(model, DOCUMENTS[:1], embedder_model=embedder, show_progress=False)


# ------------------------------------------------------------------ 3. full disks and bad paths


def mounted_tmpfs(folder: Path, size: str = "4m", inodes: int | None = None) -> Path:
    """A small tmpfs at `folder` (skips the test where mounting is not allowed); unmount with `unmounted`."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode(errors='replace').strip()}")
    return folder


@pytest.fixture
def small_disk(tmp_path):
    """`make(size, inodes, fill_bytes)` mounts a small tmpfs, fills it with a file of `fill_bytes`, returns it."""
    mounted = []

    def make(size: str = "4m", inodes: int | None = None, fill_bytes: int = 0) -> Path:
        folder = mounted_tmpfs(tmp_path / f"disk{len(mounted)}", size, inodes)
        mounted.append(folder)
        if fill_bytes:
            (folder / "fill").write_bytes(b"x" * fill_bytes)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_leaving(disk: Path, left_bytes: int) -> None:
    """Fills `disk` with a file so that about `left_bytes` stay free."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    with open(disk / "fill", "ab") as handle:
        handle.write(b"x" * max(free - left_bytes, 0))


@pytest.mark.parametrize("left_kib", [0, 4, 200, 1000, 2000, 3000])
def test_a_save_on_a_full_disk_raises_a_file_error_and_keeps_the_previous_learner(tiny_model, small_disk, left_kib):
    disk = small_disk("8m")
    tiny_model.save_pretrained(disk / "learner")  # the previous learner, before the disk is full
    before = {path.name: path.read_bytes() for path in (disk / "learner").iterdir() if path.is_file()}
    fill_leaving(disk, left_kib * 1024)
    with torch.no_grad():
        for parameter in tiny_model.lora_parameters().values():
            parameter.add_(1.0)
    with pytest.raises(ReGradFileError, match="disk is full") as caught:
        tiny_model.save_pretrained(disk / "learner")
    assert caught.value.errno == errno.ENOSPC
    after = {path.name: path.read_bytes() for path in (disk / "learner").iterdir() if path.is_file()}
    assert after == before
    (disk / "fill").unlink()
    ReGradForCausalLM.from_pretrained(disk / "learner", base_model=make_tiny_base(tiny_model.tokenizer))


def test_a_save_on_a_disk_without_inodes_raises_a_file_error(tiny_model, small_disk, tiny_bank):
    disk = small_disk("64m", inodes=4)
    for call in (
        lambda: tiny_model.save_pretrained(disk / "learner"),
        lambda: tiny_model.export_adapter(disk / "adapter", documents=["Zorbia is a harbour town."]),
        lambda: tiny_bank.save_pretrained(disk / "bank"),
    ):
        with pytest.raises(ReGradFileError):
            call()


@pytest.mark.parametrize("left_kib", [0, 4])
def test_exports_and_bank_saves_on_a_full_disk_raise_file_errors(tiny_model, tiny_bank, small_disk, left_kib):
    disk = small_disk("4m")
    fill_leaving(disk, left_kib * 1024)
    with pytest.raises(ReGradFileError):
        tiny_model.export_adapter(disk / "adapter", documents=["Zorbia is a harbour town."])
    with pytest.raises(ReGradFileError):
        tiny_bank.save_pretrained(disk / "bank")


def test_a_library_that_reports_a_full_disk_as_a_plain_exception_gives_a_file_error(tiny_model, tmp_path, monkeypatch):
    # tokenizers (Rust) raise `Exception("No space left on device (os error 28)")`
    def full(*args, **kwargs):
        raise Exception("No space left on device (os error 28)")  # noqa: TRY002 - what tokenizers raise

    monkeypatch.setattr(tiny_model.tokenizer, "save_pretrained", full)
    with pytest.raises(ReGradFileError, match="disk is full") as caught:
        tiny_model.save_pretrained(tmp_path / "learner")
    assert caught.value.errno == errno.ENOSPC
    assert not (tmp_path / "learner" / "config.json").exists()


BAD_DIRECTORIES = [
    ("", ReGradValueError),
    ("   ", ReGradValueError),
    (None, ReGradTypeError),
    (123, ReGradTypeError),
    (b"adapter", ReGradTypeError),
    ("a-file", ReGradFileError),
    ("a-file/below", ReGradFileError),
    ("a-file/below/deeper", ReGradFileError),
]


@pytest.mark.parametrize(("directory", "error"), BAD_DIRECTORIES)
def test_every_writer_refuses_the_same_bad_directories_with_the_same_typed_errors(
    tiny_model, tiny_bank, tmp_path, monkeypatch, directory, error
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    before = sorted(path.name for path in tmp_path.iterdir())
    writers = [
        lambda: tiny_model.export_adapter(directory),
        lambda: tiny_model.export_adapter(directory, documents=["Zorbia is a harbour town."]),
        lambda: tiny_model.save_pretrained(directory),
        lambda: tiny_bank.save_pretrained(directory),
    ]
    for write in writers:
        with pytest.raises(error):
            write()
    assert sorted(path.name for path in tmp_path.iterdir()) == before
    assert (tmp_path / "a-file").read_text() == "not a folder"


# ------------------------------------------------------------------ 4. what saves always loads


def test_a_document_whose_stored_line_would_pass_the_load_cap_is_refused_when_added(tiny_bank, tiny_model, tmp_path):
    # JSON writes each control character as 6 bytes: 11.3 M characters are 68 MB on disk, over the 64 MiB line cap
    before = sorted(tiny_bank.ids)
    with pytest.raises(ReGradValueError, match="bytes"):
        tiny_bank.add(tiny_model, ["\x01" * 11_300_000], ids=["control"], show_progress=False)
    assert sorted(tiny_bank.ids) == before
    tiny_bank.save_pretrained(tmp_path / "bank")
    assert sorted(GradientBank.from_pretrained(tmp_path / "bank").ids) == before


def largest_accepted(accepts, low: int, high: int) -> int:
    """The largest n in [low, high) with accepts(n), for a predicate true up to some n and false after."""
    assert accepts(low) and not accepts(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if accepts(middle) else (low, middle)
    return low


FIELDS = {
    "text": lambda n: ("A text: " + "\x01" * n, "doc", {}),
    "metadata": lambda n: ("A plain document text.", "doc", {"note": "\x01" * n}),
    "id": lambda n: ("A plain document text.", "d" + "\x01" * n, {}),
    "metadata keys": lambda n: ("A plain document text.", "doc", {f"k{i}": "\x02" for i in range(n)}),
}


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.filterwarnings("ignore:.*truncated to max_document_tokens")
def test_the_largest_accepted_value_of_every_field_saves_and_loads_again(
    tiny_model, embedder, tmp_path, monkeypatch, field
):
    # the load's caps, made small so that the largest values are cheap; entry and load read the same constants
    from regrad_hf.bank import schema

    monkeypatch.setattr(schema, "MAX_DOCUMENT_RECORD_BYTES", 4096)
    monkeypatch.setattr(schema, "MAX_METADATA_BYTES", 2048)
    monkeypatch.setattr(schema, "MAX_ID_CHARS", 800)
    bank = GradientBank.build(tiny_model, DOCUMENTS[:1], ids=IDS[:1], embedder_model=embedder, show_progress=False)

    def accepts(n: int) -> bool:
        text, doc_id, metadata = FIELDS[field](n)
        try:
            bank.add(tiny_model, [text], ids=[doc_id], metadata=[metadata], show_progress=False)
        except ReGradValueError:
            return False
        bank.remove([doc_id])
        return True

    largest = largest_accepted(accepts, 0, 5000)
    text, doc_id, metadata = FIELDS[field](largest)
    bank.add(tiny_model, [text], ids=[doc_id], metadata=[metadata], show_progress=False)
    bank.save_pretrained(tmp_path / "bank")
    loaded = GradientBank.from_pretrained(tmp_path / "bank")
    hit = loaded.document(doc_id)
    assert (hit.text, hit.metadata) == (text, metadata)


def test_max_document_tokens_is_bounded_by_the_base_models_positions(tokenizer, tiny_model):
    from regrad_hf import ReGradConfig

    base = make_tiny_base(tokenizer)  # 512 positions
    with pytest.raises(ReGradValueError, match="512 positions"):
        ReGradForCausalLM.from_base(base, ReGradConfig(max_document_tokens=1 << 20), tokenizer=tokenizer)
    assert not any(".lora_" in name for name, _ in base.named_parameters())  # the caller's model as it came
    ReGradForCausalLM.from_base(base, ReGradConfig(max_document_tokens=512), tokenizer=tokenizer)
    tiny_model.config.max_document_tokens = 1 << 20  # edited after construction: refused when used
    with pytest.raises(ReGradValueError, match="512 positions"):
        tiny_model.document_gradients(["An eight-thousand-word document. " * 10])


@pytest.mark.parametrize("base", ["/etc", "empty", "../../../../etc/passwd", "a-file", "itself"])
def test_a_learner_whose_base_cannot_be_loaded_gives_a_typed_error_naming_the_field(tiny_model, tmp_path, base):
    import json

    from regrad_hf import ReGradError

    learner = tmp_path / "learner"
    tiny_model.save_pretrained(learner)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("not a model")
    named = {"empty": str(tmp_path / "empty"), "a-file": str(tmp_path / "a-file"), "itself": str(learner)}
    config = json.loads((learner / "config.json").read_text())
    config["base_model_name_or_path"] = named.get(base, base)
    (learner / "config.json").write_text(json.dumps(config))
    with pytest.raises(ReGradError, match="base_model_name_or_path"):
        ReGradForCausalLM.from_pretrained(learner, local_files_only=True)


# ------------------------------------------------------------------ 5. the batching server under hostile callbacks

GREEDY = {"max_new_tokens": 4, "do_sample": False}
PROMPTS = ["What is the capital of Zorbia?", "Who discovered halvorite?", "How do you play Quillon?"]


class RaisesOnToken(StoppingCriteria):
    """A stopping criterion that raises `error` in any batch holding `token` (a hostile user callback)."""

    def __init__(self, token: int, error: type[BaseException]):
        self.token, self.error = token, error

    def __call__(self, input_ids, scores, **kwargs):
        if (input_ids == self.token).any():
            raise self.error("raised by a request's stopping criterion")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def served_alone(model, tokenizer, prompt) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids if isinstance(prompt, str) else torch.tensor([prompt])
    return model.generate(input_ids=ids, **GREEDY)[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_a_stopping_criterion_that_raises_a_base_exception_reaches_its_caller_alone(tiny_model, tokenizer, error):
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    poison = max(max(p) for p in prompts) + 1
    prompts[1] = [*prompts[1], poison]
    criteria = StoppingCriteriaList([RaisesOnToken(poison, error)])  # one object: the requests share a batch
    before = parameter_bytes(tiny_model)
    generator = BatchingGenerator(tiny_model, max_batch_size=3, max_wait_ms=1000)  # the three fill a batch
    try:
        futures = [generator.submit(p, stopping_criteria=criteria, **GREEDY) for p in prompts]
        assert isinstance(futures[1].exception(timeout=120), error)
        for index in (0, 2):
            assert futures[index].result(timeout=120).token_ids == served_alone(tiny_model, tokenizer, prompts[index])
        assert generator._worker.is_alive()  # still serving
        with pytest.raises(error):
            generator.generate(prompts[1], stopping_criteria=criteria, timeout=120, **GREEDY)
        assert generator.generate(PROMPTS[0], timeout=120, **GREEDY).token_ids == served_alone(
            tiny_model, tokenizer, PROMPTS[0]
        )
    finally:
        generator.close(cancel_pending=True, timeout=120)
    assert parameter_bytes(tiny_model) == before


def test_a_done_callback_that_waits_on_the_server_is_refused_and_the_server_serves_on(tiny_model, tokenizer):
    seen = []

    with BatchingGenerator(tiny_model, max_wait_ms=0) as generator:

        def waits(future):
            try:
                generator.generate(PROMPTS[1], timeout=5, **GREEDY)
            except ReGradError as error:
                seen.append(error)
            seen.append(generator.submit(PROMPTS[2], **GREEDY))  # submitting from a callback is fine

        def exits(future):
            raise SystemExit("a hostile done callback")

        first = generator.submit(PROMPTS[0], **GREEDY)
        first.add_done_callback(waits)
        first.add_done_callback(exits)
        assert first.result(timeout=120).token_ids == served_alone(tiny_model, tokenizer, PROMPTS[0])
        later = generator.submit(PROMPTS[1], **GREEDY)
        assert later.result(timeout=120).token_ids == served_alone(tiny_model, tokenizer, PROMPTS[1])
        assert isinstance(seen[0], ReGradError) and "worker" in str(seen[0])
        assert seen[1].result(timeout=120).token_ids == served_alone(tiny_model, tokenizer, PROMPTS[2])
        assert generator._worker.is_alive()


def test_an_infinite_timeout_means_none_and_a_huge_finite_one_is_refused(tiny_model, tokenizer):
    with BatchingGenerator(tiny_model, max_wait_ms=0) as generator:
        result = generator.generate(PROMPTS[0], timeout=math.inf, **GREEDY)
        assert result.token_ids == served_alone(tiny_model, tokenizer, PROMPTS[0])
        for huge in (1e300, float(threading.TIMEOUT_MAX) * 2):
            with pytest.raises(ReGradValueError, match="longest wait"):
                generator.generate(PROMPTS[0], timeout=huge, **GREEDY)
        with pytest.raises(ReGradValueError, match="longest wait"):
            generator.close(timeout=1e300)
        generator.close(timeout=math.inf)
    assert not generator._worker.is_alive()


# ------------------------------------------------------------------ 2. Ctrl-C anywhere

SOURCES = str(Path(regrad_files.__file__).parent)


def interrupted(call, at: int) -> str | None:
    """Runs `call()` with a `KeyboardInterrupt` raised at its `at`-th executed line of regrad_hf code (a Ctrl-C
    landing there, clean-up code included); returns where it landed, or `None` when the call finished first.
    With `at=0`, nothing is raised and the number of lines is returned."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
            if count == at:
                raise KeyboardInterrupt(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
        return local

    sys.settrace(lambda frame, event, arg: local if frame.f_code.co_filename.startswith(SOURCES) else None)
    try:
        call()
    except KeyboardInterrupt as error:  # the interrupt itself, never another error in its place
        return str(error)
    finally:
        sys.settrace(None)
    return count if at == 0 else None


def capture_hooks(model) -> int:
    """The forward hooks on the model's modules (the tiny model has none of its own)."""
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


# The restore's own clean-up: an interrupt landing there (a second one, or the first at the block's end) leaves the LoRA
# tensors adapted until the next call, which finds the level whose block has ended and puts them back.
_INNERMOST, _FIRST = inspect.getsourcelines(restore_module.ExactRestore._restore_innermost)
_WRITTEN, _WRITTEN_FIRST = inspect.getsourcelines(restore_module.ExactRestore._written)
_UNWIND = _WRITTEN_FIRST + next(n for n, line in enumerate(_WRITTEN) if "while level in self._active" in line)
RESTORE_CLEAN_UP = {f"restore.py:{line}" for line in (_UNWIND, *range(_FIRST, _FIRST + len(_INNERMOST)))}


def interrupt_everywhere(call, window: int = 450, stride: int = 3, spread: int = 100):
    """Yields where each interrupt landed: at every `stride`-th line of the first and the last `window` lines the
    call runs (setting up and cleaning up), and at `spread` lines in between; hundreds of points in all."""
    total = interrupted(call, 0)
    points = {*range(1, window, stride), *range(max(1, total - window), total + 1, stride)}
    points |= set(range(1, total + 1, max(1, total // spread)))
    for at in sorted(points):
        where = interrupted(call, at)
        if where is None:  # a later call runs fewer lines (caches): done
            return
        yield where


@pytest.mark.parametrize("operation", ["document_gradients", "knowledge"])
def test_interrupts_at_hundreds_of_points_leave_the_model_as_it_was(tiny_model, tokenizer, operation):
    """A Ctrl-C at any line of the call (its clean-up included) propagates as itself; after it, the tensors are
    bit for bit as before, no restore level is left, and any capture hook a cut clean-up left behind records nothing
    and is gone after the next forward; the next call gives what it gives uninterrupted."""

    def knowledge():
        with tiny_model.knowledge(DOCUMENTS[:2]):
            pass

    call = {"document_gradients": lambda: tiny_model.document_gradients(DOCUMENTS[:3]), "knowledge": knowledge}[
        operation
    ]
    expected = tiny_model.document_gradients(DOCUMENTS[:3])
    before = parameter_bytes(tiny_model)
    ids = tokenizer("The capital of Zorbia", return_tensors="pt").input_ids
    plain = tiny_model(input_ids=ids).logits
    landed = []
    for number, where in enumerate(interrupt_everywhere(call)):
        landed.append(where)
        assert torch.is_grad_enabled(), where  # autograd is not left off for the caller
        if where not in RESTORE_CLEAN_UP:  # elsewhere, restored before the interrupt reaches the caller
            assert parameter_bytes(tiny_model) == before, where
        assert torch.equal(tiny_model(input_ids=ids).logits, plain), where  # the next call: repaired first
        assert parameter_bytes(tiny_model) == before and not tiny_model._restore._active, where
        assert capture_hooks(tiny_model) == 0, where
        if number % 50 == 0:
            stacked = tiny_model.document_gradients(DOCUMENTS[:3])
            assert all(torch.equal(stacked[name], expected[name]) for name in expected), where
    assert len(landed) >= 200, "the harness should interrupt hundreds of points"
    call()
    assert parameter_bytes(tiny_model) == before and capture_hooks(tiny_model) == 0


def test_interrupts_at_hundreds_of_points_of_a_per_row_generate_leave_no_hook_and_no_mark(tokenizer, embedder):
    """Rows that retrieve different documents run with per-row hooks: a Ctrl-C anywhere (their clean-up included)
    leaves no hook that changes a later forward, and no marker that refuses later `generate` calls."""
    model = make_tiny_model(tokenizer, top_k_docs=1)
    model.attach_bank(GradientBank.build(model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False))
    prompts = ["Where is Quentville?", "Tell me about the Velomar bicycle"]
    padded = [[tokenizer.pad_token_id] * (12 - len(ids)) + ids for ids in tokenizer(prompts).input_ids]
    inputs = {"input_ids": torch.tensor(padded), "attention_mask": (torch.tensor(padded) != tokenizer.pad_token_id)}
    queries = ["Quentville Zorbia capital", "Velomar bicycle bamboo frame"]

    def generate():
        return model.generate(**inputs, query=queries, max_new_tokens=3, do_sample=False)

    expected, before = generate(), parameter_bytes(model)
    ids = tokenizer("The capital of Zorbia", return_tensors="pt").input_ids
    plain = model(input_ids=ids).logits
    landed = 0
    for number, where in enumerate(interrupt_everywhere(generate)):
        landed += 1
        assert parameter_bytes(model) == before, where
        assert torch.equal(model(input_ids=ids).logits, plain), where  # a stale hook changes nothing, is removed
        assert capture_hooks(model) == 0, where
        if number % 50 == 0:
            assert torch.equal(generate(), expected), where  # not refused by a marker an interrupt left
    assert landed >= 200
    assert torch.equal(generate(), expected)


def test_an_interrupt_inside_the_restore_of_the_lora_tensors_is_repaired_by_the_next_call(tiny_model, tokenizer):
    """An interrupt at each line of the restore's own clean-up (a second Ctrl-C while the first unwinds, or one at
    the block's end) may leave the tensors adapted; whatever the next call is, it finds the level whose block has
    ended and puts the tensors back bit for bit before using them: the model is never used dirty."""
    before = parameter_bytes(tiny_model)
    ids = tokenizer("The capital of Zorbia", return_tensors="pt").input_ids
    plain = tiny_model(input_ids=ids).logits
    expected = tiny_model.document_gradients(DOCUMENTS[:1])
    generated = tiny_model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, use_bank=False)
    fingerprint, state = tiny_model.fingerprint(), tiny_model.learner_state_dict()
    next_calls = {
        "forward": lambda: torch.equal(tiny_model(input_ids=ids).logits, plain),
        "generate": lambda: torch.equal(
            tiny_model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, use_bank=False), generated
        ),
        "document_gradients": lambda: all(
            torch.equal(value, expected[name]) for name, value in tiny_model.document_gradients(DOCUMENTS[:1]).items()
        ),
        "fingerprint": lambda: tiny_model.fingerprint() == fingerprint,
        "load_learner_state": lambda: tiny_model.load_learner_state(state) is None,  # refused inside a block
    }

    def knowledge():
        with tiny_model.knowledge(DOCUMENTS[:1]):
            pass

    total = interrupted(knowledge, 0)
    cut = []
    for at in range(total, max(0, total - 200), -1):  # the clean-up runs near the end
        where = interrupted(knowledge, at)
        if where not in RESTORE_CLEAN_UP:
            continue
        dirty = parameter_bytes(tiny_model) != before
        name, call = list(next_calls.items())[len(cut) % len(next_calls)]
        assert call(), (where, name)
        assert parameter_bytes(tiny_model) == before and not tiny_model._restore._active, (where, name)
        cut.append((where, dirty))
    assert len(cut) >= 3 and any(dirty for _, dirty in cut), cut  # some interrupts did leave the tensors adapted


def test_interrupts_during_an_export_propagate_as_themselves_and_a_retry_writes_it(tiny_model, tmp_path):
    def export():
        tiny_model.export_adapter(tmp_path / "adapter", documents=DOCUMENTS[:1])

    landed = list(interrupt_everywhere(export))
    assert len(landed) >= 100
    export()
    (tmp_path / "expected").mkdir()
    tiny_model.export_adapter(tmp_path / "expected", documents=DOCUMENTS[:1])
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "adapter" / name).read_bytes() == (tmp_path / "expected" / name).read_bytes()


def test_an_interrupt_right_after_the_rename_of_an_atomic_write_is_a_keyboard_interrupt(tmp_path, monkeypatch):
    replace = os.replace

    def replaced_then_interrupted(source, target):
        replace(source, target)
        raise KeyboardInterrupt

    monkeypatch.setattr(regrad_files.os, "replace", replaced_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        regrad_files.atomic_write_text(tmp_path / "file.json", "new")
    assert (tmp_path / "file.json").read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file.json"]


def test_usearch_reporting_a_ctrl_c_as_terminated_surfaces_as_keyboard_interrupt(tiny_bank, monkeypatch):
    def terminated(*args, **kwargs):
        raise RuntimeError("Operation has been terminated")

    monkeypatch.setattr(tiny_bank.index._index, "search", terminated)
    with pytest.raises(KeyboardInterrupt):
        tiny_bank.search("Where is Quentville?", k=2)

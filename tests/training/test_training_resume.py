"""Hostile and failed checkpoints of meta-training: each resume either continues the run's own state or raises a
`ReGradError` before anything is loaded; a failed or concurrent checkpoint write leaves the previous one loadable."""

import errno
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from regrad_hf.cli import main
from regrad_hf.errors import ReGradError, ReGradFileError, ReGradValueError
from regrad_hf.files import exclusive_lock, flocked
from regrad_hf.training import ReGradTrainer
from regrad_hf.training.checkpoints import check_checkpoint, export_compact_checkpoint, last_checkpoint

from ..conftest import make_tiny_base, make_tiny_model, parameter_bytes
from .test_training import arguments, color_tasks

TASKS = color_tasks(8, 0, 0)


@pytest.fixture(scope="module")
def run(tokenizer, tmp_path_factory):
    """A finished 2-step run with checkpoint-1 and checkpoint-2, and the compact form of checkpoint-1."""
    root = tmp_path_factory.mktemp("resume")
    args = arguments(root, max_steps=2, save_strategy="steps", save_steps=1)
    ReGradTrainer(make_tiny_model(tokenizer), args, train_dataset=TASKS).train()
    export_compact_checkpoint(root / "run" / "checkpoint-1", root / "compact")
    return root


@pytest.fixture
def checkpoint(run, tmp_path):
    """A copy of checkpoint-1 to damage."""
    return shutil.copytree(run / "run" / "checkpoint-1", tmp_path / "checkpoint-1")


def resume(tokenizer, tmp_path, checkpoint, tasks=TASKS, checked_first=True, **overrides):
    model = make_tiny_model(tokenizer, seed=5)
    before = parameter_bytes(model)
    trainer = ReGradTrainer(model, arguments(tmp_path / "resumed", max_steps=2, **overrides), train_dataset=tasks)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    except ReGradError:
        if checked_first:  # refused before anything was loaded (the optimizer's files load after the learner)
            assert parameter_bytes(model) == before
        raise
    return trainer


def edit_state(checkpoint, **fields):
    path = checkpoint / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: (c / "trainer_state.json").write_text(""),
        lambda c: (c / "trainer_state.json").write_text('{"global_step": 1'),  # truncated
        lambda c: (c / "trainer_state.json").write_text("[1, 2]"),
        lambda c: (c / "trainer_state.json").write_text("{}"),  # would resume at step 0 with step 1's learner
        lambda c: edit_state(c, bogus=1),
        lambda c: edit_state(c, global_step="1"),
        lambda c: edit_state(c, global_step=-5),
        lambda c: edit_state(c, global_step=float("nan")),
        lambda c: edit_state(c, global_step=10**6, max_steps=10**6),  # not the step its name says
        lambda c: edit_state(c, epoch=float("inf")),
        lambda c: edit_state(c, log_history=3),
        lambda c: edit_state(c, log_history=[{"step": 1, "wall_seconds": "soon"}]),
        lambda c: edit_state(c, stateful_callbacks={"TrainerControl": {"args": {"should_training_stop": "yes"}}}),
        lambda c: edit_state(c, stateful_callbacks={"TrainerControl": {"args": {"unknown_flag": True}}}),
    ],
)
def test_a_damaged_trainer_state_is_refused(tokenizer, tmp_path, checkpoint, damage):
    damage(checkpoint)
    with pytest.raises(ReGradValueError, match="trainer_state.json|trainer state|step"):
        resume(tokenizer, tmp_path, checkpoint)


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
@pytest.mark.parametrize("data", [b"", b"garbage", None])  # None: the file truncated to half
def test_a_damaged_torch_state_file_raises_a_typed_error(tokenizer, tmp_path, checkpoint, name, data):
    path = checkpoint / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if data is None else data)
    with pytest.raises(ReGradValueError, match="cannot be loaded"):
        resume(tokenizer, tmp_path, checkpoint, checked_first=False)


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"])
def test_an_incomplete_checkpoint_is_refused_not_resumed_with_a_fresh_state(tokenizer, tmp_path, checkpoint, name):
    (checkpoint / name).unlink()  # Trainer resumes without an optimizer.pt or scheduler.pt, from fresh ones
    with pytest.raises(ReGradValueError, match=f"not a complete .*{name.split('.')[0]}"):
        resume(tokenizer, tmp_path, checkpoint)


def test_symlinks_files_and_missing_folders_are_refused(tokenizer, tmp_path, checkpoint):
    link = tmp_path / "link"
    link.symlink_to(checkpoint, target_is_directory=True)
    with pytest.raises(ReGradFileError, match="symlink"):
        resume(tokenizer, tmp_path, link)
    for missing, match in [(checkpoint / "config.json", "is a file"), (tmp_path / "nowhere", "does not exist")]:
        with pytest.raises(ReGradFileError, match=match):
            resume(tokenizer, tmp_path, missing)
    outside = tmp_path / "outside.safetensors"
    (checkpoint / "learner.safetensors").rename(outside)
    (checkpoint / "learner.safetensors").symlink_to(outside)
    with pytest.raises(ReGradFileError, match="symlinks"):
        resume(tokenizer, tmp_path, checkpoint)


@pytest.mark.parametrize(
    ("overrides", "tasks", "field"),
    [
        ({"seed": 7}, TASKS, "seed"),
        ({}, TASKS[::-1], "tasks_sha256"),
        ({"per_device_train_batch_size": 1}, TASKS, "per_device_train_batch_size"),
        ({"gradient_accumulation_steps": 2}, TASKS, "gradient_accumulation_steps"),
    ],
)
def test_a_checkpoint_of_another_run_is_refused(tokenizer, tmp_path, checkpoint, overrides, tasks, field):
    with pytest.raises(ReGradValueError, match=f"other {field}"):
        resume(tokenizer, tmp_path, checkpoint, tasks=tasks, **overrides)
    assert resume(tokenizer, tmp_path, checkpoint).state.global_step == 2  # the same run's arguments resume


def test_a_checkpoint_without_a_recorded_identity_resumes_and_its_next_checkpoints_record_it(
    tokenizer, tmp_path, checkpoint
):
    # Checkpoints written before the run identity was recorded are not checked; resuming one must also save.
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    identity = state["stateful_callbacks"].pop("RunIdentityCallback")
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    trainer = resume(tokenizer, tmp_path, checkpoint, save_strategy="steps", save_steps=1)
    assert trainer.state.global_step == 2
    saved = json.loads((tmp_path / "resumed" / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["RunIdentityCallback"] == identity


def test_another_lora_rank_is_refused(tokenizer, tmp_path, checkpoint):
    trainer = ReGradTrainer(make_tiny_model(tokenizer, lora_rank=2), arguments(tmp_path), train_dataset=TASKS)
    with pytest.raises(ReGradValueError, match="does not fit"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def rewrite_compact_optimizer(folder, edit):
    path = folder / "optimizer.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    edit(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize(
    "edit",
    [
        lambda t, m: m.pop("param_groups"),
        lambda t, m: m.update(param_groups="[{"),
        lambda t, m: m.update(param_groups="[]"),
        lambda t, m: t.update({"x.y": torch.zeros(1)}),
        lambda t, m: t.pop("0.exp_avg.scales"),
        lambda t, m: t["0.exp_avg.scales"].fill_(float("nan")),  # loaded as it was before
    ],
)
def test_a_damaged_compact_optimizer_state_raises_a_typed_error(tokenizer, run, tmp_path, edit):
    compact = shutil.copytree(run / "compact", tmp_path / "compact")
    rewrite_compact_optimizer(compact, edit)
    with pytest.raises(ReGradValueError, match="optimizer"):
        resume(tokenizer, tmp_path, compact, checked_first=False)


def test_a_failed_checkpoint_write_keeps_the_previous_one(tokenizer, run, tmp_path, monkeypatch):
    """checkpoint-2 of an earlier run is rewritten by a resumed one whose save fails half way: the folder must not
    pass for complete (it holds the new learner and the old trainer state), and the error is a typed one."""
    output = shutil.copytree(run / "run", tmp_path / "run")
    args = arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer = ReGradTrainer(make_tiny_model(tokenizer), args, train_dataset=TASKS)

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ReGradFileError, match="checkpoint-2"):
        trainer.train(resume_from_checkpoint=str(output / "checkpoint-1"))
    monkeypatch.undo()
    assert last_checkpoint(output) == str(output / "checkpoint-1")
    trainer = ReGradTrainer(make_tiny_model(tokenizer), args, train_dataset=TASKS)
    trainer.train(resume_from_checkpoint=True)  # the newest complete one
    assert trainer.state.global_step == 2 and last_checkpoint(output) == str(output / "checkpoint-2")


def test_checkpoint_writes_into_one_run_folder_wait_for_each_other(tokenizer, tmp_path):
    args = arguments(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    trainer = ReGradTrainer(make_tiny_model(tokenizer), args, train_dataset=TASKS)
    (tmp_path / "run").mkdir(exist_ok=True)
    errors = []
    with flocked(tmp_path / "run", os.O_RDONLY | os.O_DIRECTORY):  # another run writing a checkpoint
        thread = threading.Thread(target=_record, args=(errors, trainer.train))
        thread.start()
        time.sleep(3)
        assert not (tmp_path / "run" / "checkpoint-1" / "trainer_state.json").exists()
    thread.join(60)
    assert not errors and last_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "checkpoint-1")


def _record(errors, call):
    try:
        call()
    except BaseException as error:  # noqa: BLE001 - reported by the test's assertion
        errors.append(error)


def test_compact_exports_into_one_folder_wait_for_each_other_and_fail_cleanly(run, tmp_path, monkeypatch):
    compact = shutil.copytree(run / "compact", tmp_path / "compact")
    before = {p.name: p.read_bytes() for p in compact.iterdir()}
    errors = []
    with exclusive_lock(compact):
        thread = threading.Thread(
            target=_record, args=(errors, lambda: export_compact_checkpoint(run / "run" / "checkpoint-2", compact))
        )
        thread.start()
        time.sleep(1)
        assert not list(tmp_path.glob(".compact.staging*"))  # it waits before writing anything
        assert {p.name: p.read_bytes() for p in compact.iterdir()} == before
    thread.join(60)
    assert not errors and json.loads((compact / "trainer_state.json").read_text())["global_step"] == 2

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    with pytest.raises(ReGradFileError, match="disk is full"):
        export_compact_checkpoint(run / "run" / "checkpoint-1", compact)
    assert json.loads((compact / "trainer_state.json").read_text())["global_step"] == 2
    assert not list(tmp_path.glob(".compact.staging*"))


def test_a_compact_export_killed_between_its_two_renames_leaves_a_checkpoint_that_is_put_back(
    tokenizer, run, tmp_path, monkeypatch
):
    """The disk as a kill between the export's two renames leaves it (copied at that moment): no folder, only the
    previous one aside. Checking it for a resume puts the previous checkpoint back, whole, and it resumes."""
    compact = shutil.copytree(run / "compact", tmp_path / "out" / "compact")
    before = {path.name: path.read_bytes() for path in compact.iterdir()}
    killed = tmp_path / "killed"
    rename = Path.rename

    def rename_after_a_snapshot(self, target):
        if Path(target) == compact and not compact.exists():  # the second rename: what a kill here leaves
            shutil.copytree(compact.parent, killed, symlinks=True)
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_after_a_snapshot)
    export_compact_checkpoint(run / "run" / "checkpoint-2", compact)
    monkeypatch.undo()
    assert json.loads((compact / "trainer_state.json").read_text())["global_step"] == 2
    assert killed.is_dir() and not (killed / "compact").exists()
    assert check_checkpoint(killed / "compact")["global_step"] == 1
    assert {path.name: path.read_bytes() for path in (killed / "compact").iterdir()} == before
    assert sorted(path.name for path in killed.iterdir()) == [".compact.lock", "compact"]  # no leftover
    assert resume(tokenizer, tmp_path, killed / "compact", checked_first=False).state.global_step == 2


def test_train_command_reports_a_bad_resume_in_one_line_and_resume_last_skips_a_killed_save(
    tokenizer, tmp_path, capsys
):
    make_tiny_base(tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps(t.to_dict()) for t in TASKS))
    argv = [
        "train", "--base_model", str(tmp_path / "base"), "--train_format", "jsonl", "--train_file", str(tasks),
        "--output_dir", str(tmp_path / "out"), "--lora_rank", "2", "--save_steps", "1", "--logging_steps", "1",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu", "true",
    ]  # fmt: skip
    assert main([*argv, "--max_steps", "2"]) == 0
    (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").unlink()  # killed while writing checkpoint-2
    capsys.readouterr()
    assert main([*argv, "--max_steps", "2", "--resume", str(tmp_path / "out" / "checkpoint-2")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # after the model's loading progress bar
    assert lines[-1].startswith("error: ") and "not a complete" in lines[-1]
    assert not any("Traceback" in line for line in lines)
    assert main([*argv, "--max_steps", "2", "--resume", "last"]) == 0
    record = json.loads((tmp_path / "out" / "training_record.json").read_text())
    assert record["resumed_from"].endswith("checkpoint-1")

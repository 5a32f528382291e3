"""Atomic writes: a failed write leaves the target as it was and raises a typed error."""

import errno

import filelock
import pytest
import torch
from safetensors import SafetensorError

from regrad_hf import files
from regrad_hf.errors import ReGradFileError

from .conftest import make_tiny_model


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failure", [full_disk, SafetensorError("I/O error: No space left on device (os error 28)")])
def test_a_save_on_a_full_disk_is_a_typed_error_and_keeps_the_old_files(tokenizer, tmp_path, monkeypatch, failure):
    model = make_tiny_model(tokenizer)
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        next(iter(model.lora_parameters().values())).add_(1.0)  # a save would change learner.safetensors

    def failing_save(*args, **kwargs):
        if isinstance(failure, Exception):
            raise failure
        failure()

    monkeypatch.setattr(files, "save_file", failing_save)
    with pytest.raises(ReGradFileError, match="disk is full") as raised:
        model.save_pretrained(tmp_path)
    assert raised.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left either


def test_a_failed_text_write_is_typed_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "notes.txt"
    target.write_text("old")
    monkeypatch.setattr(files.os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))
    with pytest.raises(ReGradFileError, match="denied"):
        files.atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_exclusive_lock_is_a_filelock_that_never_follows_a_symlink(tmp_path):
    target = tmp_path / "bank"
    with files.exclusive_lock(target), pytest.raises(filelock.Timeout):  # any filelock user of it waits
        filelock.FileLock(files.lock_path(target)).acquire(timeout=0)
    with filelock.FileLock(files.lock_path(target), timeout=0):  # released
        pass
    victim = tmp_path / "victim"
    files.lock_path(tmp_path / "other").symlink_to(victim)
    with (
        pytest.raises(ReGradFileError, match="symlink, which is never followed"),
        files.exclusive_lock(tmp_path / "other"),
    ):
        pass
    assert not victim.exists()

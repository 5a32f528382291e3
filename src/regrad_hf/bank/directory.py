"""A bank directory on disk: its layout, the writers' lock, publishing a finished bank into it whole, and reading
its files without following symlinks.

    bank_config.json                    format version, learner identity, embedder, dtype, shapes, checksums
    documents.jsonl                     one line per document: id, text, metadata, index key, shard, row
    index.usearch                       cosine index of the document embeddings, keyed by the index key
    gradients/shard-NNNNN.safetensors   per LoRA tensor name, the gradients of the shard's documents stacked

Next to a directory `D` live its lock `.D.lock` (never deleted: deleting a lock file races with its next user) and,
while a save swaps a new bank in, the journal `.D.swap` naming the backup `.D.old-*` of the previous bank.

Processes: writers (save, build, resume) hold an exclusive `flock` on the lock for their whole run, so they exclude
each other; a writer that takes the lock first repairs what a killed writer left (puts the backup back when the
journal says a swap was cut between its two renames, deletes staging and backup directories). Readers never rename
or delete anything: they read the directory as it is, and load again if a swap replaced it while they read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from ..errors import ReGradFileError
from ..files import exclusive_lock, fcntl, journal_path, lock_path, repair_swap, swap_in
from ..files import interrupted_backup as interrupted_swap
from .checkpoint import BUILD_FILES
from .schema import file_error

CONFIG_FILE = "bank_config.json"
DOCUMENTS_FILE = "documents.jsonl"
INDEX_FILE = "index.usearch"
GRADIENTS_DIR = "gradients"
BANK_FILES = (CONFIG_FILE, DOCUMENTS_FILE, INDEX_FILE, GRADIENTS_DIR)
EAGER_FILES = (CONFIG_FILE, DOCUMENTS_FILE, INDEX_FILE)  # downloaded when a bank is loaded from a repo; shards later


def sha256_of(handle) -> str:
    """SHA-256 (hex) of an open binary file, read from where it is to its end."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(1 << 22), b""):
        digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def writer_lock(target: Path) -> Iterator[None]:
    """Holds the exclusive lock of the bank directory `target` (waiting for other writers), and repairs what an
    interrupted writer left before yielding."""
    with exclusive_lock(target):
        repair(target)
        yield


def writer_active(target: Path) -> bool:
    """Whether a writer holds the lock of `target` now (a reader's probe: it takes nothing and creates nothing)."""
    if fcntl is None:
        return False
    try:
        descriptor = os.open(lock_path(target), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)


def was_a_bank(target: Path) -> bool:
    """Whether a writer has been at `target` (its lock, journal or backups are next to it): a missing `target` is
    then a bank that was deleted or is being swapped, not a Hub repo id."""
    parent = target.parent
    return lock_path(target).exists() or journal_path(target).exists() or any(parent.glob(f".{target.name}.old-*"))


def interrupted_backup(target: Path) -> Path | None:
    """The previous bank that a swap into `target` cut between its two renames left, if the journal names one."""
    return interrupted_swap(target, CONFIG_FILE)


def repair(target: Path) -> None:
    """With the lock held: puts back the previous bank if a swap was cut between its renames, then deletes what
    killed writers left ([`regrad_hf.files.repair_swap`])."""
    repair_swap(target, CONFIG_FILE)


def publish(staging: Path, target: Path) -> None:
    """With the lock held: puts `staging` in the place of `target`, keeping the files of `target` that are not part
    of a bank (copied, never through a symlink), with the journaled swap of [`regrad_hf.files.swap_in`]."""
    if target.exists():
        for entry in target.iterdir():
            if entry.name not in BANK_FILES + BUILD_FILES and not (staging / entry.name).exists():
                refuse_symlinks(entry)
                copy = shutil.copytree if entry.is_dir() else shutil.copy2
                partial = staging / f".{entry.name}.copying"  # renamed when complete: a kill never leaves half a copy
                copy(entry, partial)
                partial.rename(staging / entry.name)
    swap_in(staging, target)


def refuse_symlinks(path: Path) -> None:
    """Raises [`ReGradFileError`] naming the first symlink at or under `path` (a bank never follows one)."""
    if path.is_symlink():
        raise ReGradFileError(f"{path} is a symlink; a bank never follows symlinks: replace it by the file itself")
    if path.is_dir():
        for root, directories, files in os.walk(path):
            for name in directories + files:
                if Path(root, name).is_symlink():
                    refuse_symlinks(Path(root, name))


def regular_file(path: Path, bank: Path) -> Path:
    """`path`, checked to be a regular file reached from `bank` without a symlink (components included)."""
    current = bank
    for part in path.relative_to(bank).parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            return path  # the caller reports it missing
        except OSError as error:
            raise file_error(error, current, "read") from error
        if stat.S_ISLNK(mode):
            raise ReGradFileError(
                f"bank file {current} is a symlink; a bank never follows symlinks: replace it by the file itself"
            )
    if path.exists() and not path.is_file():
        raise ReGradFileError(f"bank file {path} is not a regular file")
    return path

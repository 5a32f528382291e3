"""Atomic file writes: write a temporary file next to the target, then rename it over the target; the lock that
makes writers of one target (processes or threads) wait for each other; and the swap that replaces a whole folder.

A write that fails (a full disk, a library's I/O error) leaves the target as it was and raises `ReGradFileError`.

A folder `D` (a bank, a compact checkpoint) is replaced whole, under its lock `.D.lock`: the writer fills a staging
folder `.D.staging-*`, writes the journal `.D.swap` naming the backup `.D.old-*`, renames `D` to the backup and the
staging folder to `D`, then deletes the journal and the backup ([`swap_in`]). A kill between the two renames leaves
no `D`, only the journaled backup: the next writer (or a reader that takes the lock) moves it back ([`repair_swap`]).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import ReGradError, ReGradFileError, ReGradTypeError, ReGradValueError

try:
    import fcntl
except ImportError:  # Windows: no flock; writers then do not exclude each other
    fcntl = None


def _current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# tempfile creates private files (0600) and directories (0700); what we publish gets the modes a plain
# open()/mkdir() would give.
_UMASK = _current_umask()
FILE_MODE = 0o666 & ~_UMASK
DIRECTORY_MODE = 0o777 & ~_UMASK


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path = Path(path)
    with file_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.close(handle)
            write(temporary)
            os.chmod(temporary, FILE_MODE)
            os.replace(temporary, path)
        except BaseException:  # a KeyboardInterrupt too: the target is the old file or the new one, never half
            with contextlib.suppress(FileNotFoundError):  # os.replace may have moved it just before an interrupt
                os.unlink(temporary)
            raise


# What an I/O failure says where a library reports it as a plain `Exception` (tokenizers: "No space left on device
# (os error 28)"): the operating system's messages for failed writes.
_WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG)
_WRITE_FAILURE_MESSAGES = tuple(os.strerror(code).lower() for code in _WRITE_FAILURES)


def is_write_failure(error: BaseException) -> bool:
    """Whether `error` is a failed file operation: an `OSError`, a safetensors I/O error, or another library's plain
    exception carrying an operating-system message ([`is_disk_failure`])."""
    if isinstance(error, ReGradError) or not isinstance(error, Exception):
        return False
    return isinstance(error, (OSError, SafetensorError)) or is_disk_failure(error)


def is_disk_failure(error: BaseException) -> bool:
    """Whether `error` says that the file system refused a write (a full disk or quota, a read-only file system,
    permissions, an I/O error), by its errno or, from libraries that raise plain exceptions, by its message."""
    if getattr(error, "errno", None) in _WRITE_FAILURES:
        return True
    message = str(error).lower()
    return "(os error" in message or any(text in message for text in _WRITE_FAILURE_MESSAGES)


@contextlib.contextmanager
def file_errors(path: str | os.PathLike) -> Iterator[None]:
    """Re-raises the failed file operations of the block ([`is_write_failure`]) as [`ReGradFileError`] naming
    `path`, whichever library made them (Python's `open`, safetensors, tokenizers); the errno is kept. Every
    writer of the library writes under it, so that a full disk or a read-only folder is one typed error."""
    try:
        yield
    except Exception as error:
        if not is_write_failure(error):
            raise
        raise write_error(error, Path(path)) from error


def write_error(error: BaseException, path: Path) -> ReGradFileError:
    """A failed write (full disk, permissions, a library's I/O error) as a typed error; the errno is kept."""
    code = getattr(error, "errno", None)
    full = code in (errno.ENOSPC, errno.EDQUOT) or any(
        text in str(error).lower() for text in ("no space left", os.strerror(errno.EDQUOT).lower())
    )
    reason = "the disk is full; free space and try again" if full else str(error)
    wrapped = ReGradFileError(f"cannot write {path}: {reason}")
    wrapped.errno = errno.ENOSPC if full and code is None else code
    return wrapped


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` so that readers see the old file or the new one, never half of one."""

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)

    _atomic_write(Path(path), write)


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """`safetensors.torch.save_file`, atomically."""
    contiguous = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    _atomic_write(Path(path), lambda temporary: save_file(contiguous, temporary, metadata=metadata))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (e.g. a rendered PNG)."""

    def write(temporary: str) -> None:
        with open(temporary, "wb") as handle:
            handle.write(data)

    _atomic_write(Path(path), write)


def lock_path(target: Path) -> Path:
    """The lock file of `target`: `.NAME.lock` beside it (kept after use, so it never has to be created twice)."""
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike) -> Iterator[None]:
    """Holds the exclusive lock of `target`'s [`lock_path`] (`filelock.FileLock`: `flock` on Unix, `msvcrt` locking
    on Windows), waiting while another process or thread holds it.

    Raises:
        [`ReGradFileError`]: the lock file cannot be opened or created; a symlink there is never followed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(target)
    lock = FileLock(path, mode=FILE_MODE)
    try:
        lock.acquire()
    except OSError as error:
        raise _lock_error(path, error) from error
    try:
        yield
    finally:
        lock.release()


def _lock_error(path: Path, error: OSError) -> ReGradFileError:
    reason = "it is a symlink, which is never followed" if error.errno == errno.ELOOP else error.strerror
    return ReGradFileError(f"cannot lock {path}: {reason or error}")


@contextlib.contextmanager
def flocked(path: Path, flags: int) -> Iterator[None]:
    """Opens `path` with the `os.open` `flags` and holds its exclusive `flock` until the block ends, waiting while
    another process or thread holds it (no exclusion where `fcntl` is missing).

    For locks on a directory itself (a learner folder, a training run), which leave no lock file in or beside it:
    `filelock.FileLock` opens its path for writing, which a directory refuses.

    Raises:
        [`ReGradFileError`]: `path` cannot be opened (under `O_NOFOLLOW`, a symlink: it is never followed).
    """
    try:
        descriptor = os.open(path, flags, FILE_MODE)
    except OSError as error:
        raise _lock_error(path, error) from error
    try:
        if fcntl is not None:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def journal_path(target: Path) -> Path:
    """The journal of a swap into the folder `target`: `.NAME.swap` beside it, naming the backup while it stands."""
    return target.parent / f".{target.name}.swap"


def interrupted_backup(target: Path, complete: str) -> Path | None:
    """The previous folder that a swap into `target` cut between its two renames left, if the journal names one that
    holds the file `complete` (what a finished folder of its kind always has)."""
    try:
        journal = json.loads(journal_path(target).read_text(encoding="utf-8"))
        backup = target.parent / journal["backup"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if backup.name.startswith(f".{target.name}.old-") and (backup / complete).is_file():
        return backup
    return None


def repair_swap(target: Path, complete: str) -> None:
    """With the lock of `target` held: puts the previous folder back if a swap was cut between its renames (see
    [`interrupted_backup`]), then deletes what killed writers left (staging and backup folders, the journal). A folder
    deleted on purpose stays deleted: without a journal, no backup is ever moved back."""
    backup = interrupted_backup(target, complete)
    if backup is not None and not target.exists():
        backup.rename(target)
    journal_path(target).unlink(missing_ok=True)
    for leftover in [*target.parent.glob(f".{target.name}.old-*"), *target.parent.glob(f".{target.name}.staging-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def staging_folder(target: Path) -> Path:
    """A new, empty `.NAME.staging-*` folder beside `target` (with the modes of a plain `mkdir`), which
    [`repair_swap`] deletes if its writer is killed."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    staging.chmod(DIRECTORY_MODE)
    return staging


def swap_in(staging: Path, target: Path) -> None:
    """With the lock of `target` held: puts the folder `staging` in the place of `target`. The previous folder is moved
    aside under a journal first, so a kill between the two renames leaves it for [`repair_swap`] to put back."""
    if not target.exists():
        staging.rename(target)
        return
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    atomic_write_text(journal_path(target), json.dumps({"backup": backup.name}) + "\n")
    target.rename(backup)
    try:
        staging.rename(target)
    except BaseException:
        if not target.exists():  # an interrupt may land just after the rename succeeded
            backup.rename(target)
        raise
    finally:
        journal_path(target).unlink(missing_ok=True)
    shutil.rmtree(backup, ignore_errors=True)


def directory_argument(value: object, what: str) -> Path:
    """`value` (a bank directory given by a caller) as a `Path`.

    Raises:
        [`ReGradTypeError`]: `value` is not a `str` or `os.PathLike` (`None`, a number, bytes).
        [`ReGradValueError`]: `value` is the empty string (which would mean the working directory: a save would swap
            it out from under the process); pass `"."` to mean it. Or it holds a NUL character, which no file name
            can (the operating system's calls would fail with a bare `ValueError`).
    """
    if not isinstance(value, (str, os.PathLike)):
        raise ReGradTypeError(f"{what} must be a directory path (str or os.PathLike), got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise ReGradValueError(f"{what} is an empty path; pass a directory ('.' for the working directory)")
    try:
        path = Path(value)
    except TypeError as error:  # an os.PathLike whose __fspath__ returns bytes
        raise ReGradTypeError(f"{what} must be a str path, got {type(value).__name__}: {error}") from error
    if "\0" in str(path):
        raise ReGradValueError(f"{what} {str(path)!r:.80} holds a NUL character, which no path can")
    return path


def output_directory(value: object, what: str, create: bool = True) -> Path:
    """`value` (the directory a writer is asked to write into: a learner, a bank, an adapter, a download) checked
    and, with `create`, created if needed: the one path check of every writer.

    Raises:
        [`ReGradTypeError`] or [`ReGradValueError`]: see [`directory_argument`] (`None`, a number, bytes, `""`).
        [`ReGradFileError`]: the path is a file, a folder above it is a file, or it cannot be created (a full disk,
            permissions).
    """
    directory = directory_argument(value, what)
    if directory.exists() and not directory.is_dir():
        raise ReGradFileError(f"cannot write to {directory} ({what}): it is a file, not a directory")
    above = next((parent for parent in directory.parents if parent.exists()), None)
    if above is not None and not above.is_dir():
        raise ReGradFileError(f"cannot write to {directory} ({what}): {above}, a folder above it, is a file")
    if not create:
        return directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if error.errno == errno.ENOTDIR:
            raise ReGradFileError(f"cannot write to {directory} ({what}): a folder above it is a file") from error
        raise write_error(error, directory) from error
    return directory

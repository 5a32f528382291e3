"""A learner directory on disk: writing its files all or nothing, and reading them without following symlinks.

    config.json              the [`ReGradConfig`]
    learner.safetensors      LoRA tensors and step sizes
    generation_config.json   the generation settings
    tokenizer files          so that `AutoTokenizer` and `pipeline` find them

A save writes every file into a hidden staging folder inside the directory first (where a full disk or a library
error fails the save before any file of the previous learner is touched), then writes a journal naming that folder
and moves the files into place, `config.json` last, and deletes the journal. Writers of one directory (threads and
processes) hold an exclusive `flock` of the directory itself for the whole save, so they never mix their files; a
writer that finds a journal (a save killed while moving files) finishes that save's moves before its own. Readers
take no lock and rename nothing: while a journal names a staging folder, a file still in that folder is read from
there, so a reader sees the previous learner or the new one, never half of each. Other files of the directory are
kept.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import GenerationConfig

from ..config import ReGradConfig
from ..errors import ReGradError, ReGradFileError, ReGradValueError
from ..files import DIRECTORY_MODE, FILE_MODE, file_errors, flocked, output_directory, write_error
from .generation_checks import check_generation_settings

CONFIG_FILE = "config.json"
LEARNER_FILE = "learner.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
MAX_CONFIG_BYTES = 16 << 20
JOURNAL_FILE = ".regrad-save.journal"
STAGING_PREFIX = ".regrad-save.staging-"
# Reads of a learner that a save changed meanwhile are retried this often (backing off up to 0.1 s, ~1.5 s in all).
READ_ATTEMPTS = 20


def save_directory(value: object) -> Path:
    """`value` (the `save_directory` of a save) as a `Path`, created if needed: [`output_directory`]."""
    return output_directory(value, "save_directory")


def write_learner(directory: Path, write: Callable[[Path], None]) -> None:
    """Saves a learner into `directory` all or nothing: `write(staging)` writes its files into a staging folder,
    which are then moved into place under the directory's lock (see the module docstring).

    Args:
        directory (`Path`): the learner directory (see [`save_directory`]).
        write (`Callable[[Path], None]`): writes the learner's files into the folder it is given.

    Raises:
        [`ReGradFileError`]: a file cannot be written (full disk, permissions), or a target is a directory; the
            previous learner is then as it was.
    """
    with flocked(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)):  # the directory itself: no lock file
        _finish_interrupted_save(directory)
        try:
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
        except OSError as error:
            raise write_error(error, directory) from error
        moving = False  # once files move in, the staging folder and journal stay until every file has moved
        try:
            with file_errors(directory):  # a full disk, whichever library writes (tokenizers raise a plain Exception)
                staging.chmod(DIRECTORY_MODE)
                write(staging)
            names = sorted((path.name for path in staging.iterdir()), key=lambda name: (name == CONFIG_FILE, name))
            for name in names:
                target = directory / name
                if target.is_dir() and not target.is_symlink():
                    raise ReGradFileError(f"cannot save the learner: {target} is a directory, not a file")
                os.chmod(staging / name, FILE_MODE)
            journal = directory / JOURNAL_FILE
            try:
                journal.write_text(json.dumps({"staging": staging.name}) + "\n", encoding="utf-8")
                moving = True
                _move_files(staging, directory, names)
                journal.unlink()
                moving = False
            except OSError as error:  # a rename within one folder fails rarely; readers still see the new learner
                raise write_error(error, directory) from error
        finally:
            if not moving:  # else the next save finishes the moves (see `_finish_interrupted_save`)
                shutil.rmtree(staging, ignore_errors=True)


def _move_files(staging: Path, directory: Path, names: list[str]) -> None:
    """Moves the staged files into the directory, in order (`config.json` last)."""
    for name in names:
        os.replace(staging / name, directory / name)


def _staging_of(directory: Path) -> Path | None:
    """The staging folder an unfinished save's journal names, if it is one (a reader's and a writer's check)."""
    journal = directory / JOURNAL_FILE
    try:
        if not stat.S_ISREG(os.lstat(journal).st_mode):
            return None
        name = json.loads(journal.read_text(encoding="utf-8"))["staging"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(name, str) or not name.startswith(STAGING_PREFIX) or "/" in name or "\\" in name:
        return None
    staging = directory / name
    return staging if staging.is_dir() and not staging.is_symlink() else None


def _finish_interrupted_save(directory: Path) -> None:
    """With the lock held: moves in the files that a killed save left in its staging folder, then deletes the
    journal and every staging folder left behind."""
    staging = _staging_of(directory)
    if staging is not None:
        names = sorted((p.name for p in staging.iterdir() if p.is_file()), key=lambda n: (n == CONFIG_FILE, n))
        _move_files(staging, directory, names)
    (directory / JOURNAL_FILE).unlink(missing_ok=True)
    for leftover in directory.glob(f"{STAGING_PREFIX}*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


def learner_file(directory: Path, name: str, *, local: bool = True) -> Path:
    """The path to read a learner file `name` from: inside the staging folder of a save that is moving its files
    in when the file is still there, else in `directory`. In a local directory the file (and the folders of a
    staging path) must not be a symlink: a learner directory never follows one.

    Args:
        directory (`Path`): the learner directory.
        name (`str`): the file's name.
        local (`bool`, defaults to `True`): `False` for a Hub cache snapshot, whose files are links into the cache.

    Raises:
        [`ReGradFileError`]: the file is a symlink, or not a regular file.
    """
    if not local:
        return directory / name
    staging = _staging_of(directory)
    path = staging / name if staging is not None and (staging / name).exists() else directory / name
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path  # the caller reports it missing
    except OSError as error:
        raise ReGradFileError(f"cannot read {path}: {error.strerror or error}") from error
    if stat.S_ISLNK(mode):
        raise ReGradFileError(
            f"{path} is a symlink; a learner directory never follows symlinks: replace it by the file itself"
        )
    if not stat.S_ISREG(mode):
        raise ReGradValueError(f"{path} is not a regular file: it is not a ReGrad learner's {name}")
    return path


def refuse_symlinked_folder(directory: Path, relative: str) -> None:
    """Raises [`ReGradFileError`] when a component of `relative` (a subfolder of the local learner `directory`,
    e.g. its `bank/`) is a symlink."""
    current = directory
    for part in Path(relative).parts:
        current = current / part
        if current.is_symlink():
            raise ReGradFileError(
                f"{current} is a symlink; a learner directory never follows symlinks: replace it by the folder itself"
            )


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from `path`, at most [`MAX_CONFIG_BYTES`] long.

    Raises:
        [`ReGradValueError`]: too large, not UTF-8, not JSON, or not an object.
        [`ReGradFileError`]: unreadable.
    """
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ReGradValueError(f"{path} is {size} bytes, more than a {what} may be ({MAX_CONFIG_BYTES})")
        text = path.read_bytes().decode("utf-8")
        value = json.loads(text)
    except OSError as error:
        raise ReGradFileError(f"cannot read {path}: {error.strerror or error}") from error
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ReGradValueError(f"{path} is not a readable {what} ({type(error).__name__}: {error})") from error
    if not isinstance(value, dict):
        raise ReGradValueError(f"{path} is not a readable {what}: it holds a {type(value).__name__}, not an object")
    return value


def read_generation_config(path: Path) -> GenerationConfig:
    """A learner's `generation_config.json`, checked (see [`check_generation_settings`]).

    Raises:
        [`ReGradValueError`]: the file is damaged (too large, not JSON, not an object) or holds a bad setting.
    """
    values = read_json_object(path, "generation config")
    check_generation_settings(values, str(path))
    try:
        return GenerationConfig.from_dict(values)
    except ReGradError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        raise ReGradValueError(
            f"{path} is not a readable generation config ({type(error).__name__}: {error})"
        ) from error


def _state_of(directory: Path) -> tuple:
    """What changes when a save commits into `directory`: its config.json's inode and time, and the journal."""
    try:
        config = os.stat(directory / CONFIG_FILE)
        config_id = (config.st_ino, config.st_mtime_ns, config.st_size)
    except OSError:
        config_id = None
    return config_id, _staging_of(directory)


def read_learner(
    directory: Path, *, local: bool = True, read_config_file: bool = True
) -> tuple[ReGradConfig | None, dict[str, torch.Tensor], Path, GenerationConfig | None]:
    """Reads a learner's files (config, tensors, generation config) as one save wrote them: when a save committed
    while they were read, they are read again (at most a few times), so that a config never meets another save's
    tensors.

    Args:
        directory (`Path`): the learner directory (or a Hub snapshot's folder).
        local (`bool`, defaults to `True`): `False` for a Hub snapshot (no symlink checks, no concurrent saves).
        read_config_file (`bool`, defaults to `True`): `False` when the caller gives the config.

    Returns:
        `tuple`: the config (`None` when not read), the tensors by name, the learner file's path (for messages), and
        the generation config (`None` for learners saved before it was written).

    Raises:
        [`ReGradValueError`]: a file is missing, damaged or holds bad values; [`ReGradFileError`]: a symlink.
    """
    for attempt in range(READ_ATTEMPTS):
        before = _state_of(directory) if local else None
        try:
            config = read_config(learner_file(directory, CONFIG_FILE, local=local)) if read_config_file else None
            path = learner_file(directory, LEARNER_FILE, local=local)
            tensors = read_tensors(path)
            generation_path = learner_file(directory, GENERATION_CONFIG_FILE, local=local)
            generation = read_generation_config(generation_path) if generation_path.is_file() else None
        except (ReGradError, OSError):
            after = _state_of(directory) if local else None
            # Read again when a save committed meanwhile, or is moving its files in: a file found in its staging
            # folder may have moved before it was opened, while config.json (moved last) and the journal stay the
            # same. A save holds its lock while it moves, so a descheduled writer is waited for, briefly.
            saving = after is not None and after[1] is not None
            if not local or attempt == READ_ATTEMPTS - 1 or (after == before and not saving):
                raise
            time.sleep(min(0.001 * 2**attempt, 0.1))
            continue
        if not local or _state_of(directory) == before:
            break
    return config, tensors, path, generation


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a `learner.safetensors` file.

    Raises:
        [`ReGradValueError`]: not a readable safetensors file (truncated, damaged).
    """
    try:
        with safe_open(str(path), framework="pt") as file:
            return {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 - not iterable
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise ReGradValueError(
            f"{path} is not a readable learner file ({type(error).__name__}: {error}); save or download it again"
        ) from error


def read_config(path: Path) -> ReGradConfig:
    """The [`ReGradConfig`] of a `config.json`, with a damaged file (too large, not JSON, not an object, bad values)
    a typed error.

    Raises:
        [`ReGradValueError`]: naming the file, or the bad field.
    """
    values = read_json_object(path, "ReGrad config")
    try:
        return ReGradConfig(**ReGradConfig._with_legacy_prompt(values))
    except ReGradError:
        raise
    except (ValueError, TypeError, AttributeError, RecursionError) as error:
        raise ReGradValueError(f"{path} is not a readable ReGrad config ({type(error).__name__}: {error})") from error

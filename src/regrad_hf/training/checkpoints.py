"""Compact resumable checkpoints: what continuing a meta-training run needs, small enough to commit.

A `Trainer` checkpoint of the SmolLM2 learner is ~20 MB: the learner (fp32, 6.1 MB), AdamW's two moments (fp32,
12.2 MB), the scheduler, RNG and trainer state, and the tokenizer. [`export_compact_checkpoint`] keeps:

- the learner exactly (`config.json`, `learner.safetensors`, fp32);
- the scheduler (`scheduler.pt`), RNG (`rng_state.pth`, or one per process) and trainer state
  (`trainer_state.json`, which holds the step, hence the data order: `Trainer` skips the batches already seen),
  unchanged;
- AdamW's moments in `optimizer.safetensors`: the first (`exp_avg`) in 8 bits (one scale per block of 4,096
  values), the second (`exp_avg_sq`) as the row and column means of each matrix (Adafactor's factorisation;
  AdamW then continues with that rank-one estimate, which its beta2 = 0.999 average replaces over ~1,000 steps).
  Both moments in 8 bits would make the SmolLM2 state 9.1 MB, over the 8 MB a commit allows.

So the SmolLM2 state is 7.6 MB, and a run resumed from it continues the same data order and schedule from the same
learner; its optimizer steps are close to, not bit-equal with, an uninterrupted run's (a full `Trainer` checkpoint
gives bit-equality). [`ReGradTrainer`] loads either kind with `train(resume_from_checkpoint=...)`.

Before a resume, [`check_checkpoint`] refuses a folder that is incomplete (a run killed while writing it), holds a
symlink, or whose `trainer_state.json` is damaged; [`check_run_identity`] refuses one written by a run with other
tasks, seed or batch layout (the data order it continues would not be that run's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers.trainer_callback import TrainerControl, TrainerState

from ..errors import ReGradError, ReGradFileError, ReGradValueError
from ..files import (
    atomic_save_safetensors,
    directory_argument,
    exclusive_lock,
    interrupted_backup,
    repair_swap,
    staging_folder,
    swap_in,
    write_error,
)
from ..modeling.learner_files import read_json_object

logger = logging.getLogger(__name__)

COMPACT_OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"  # Trainer writes it last: a folder without it is an unfinished checkpoint
# What a compact checkpoint copies from a Trainer checkpoint unchanged.
KEPT_FILES = ("config.json", "learner.safetensors", "scheduler.pt", TRAINER_STATE_FILE)
# RNG states: `rng_state.pth`, or one `rng_state_<rank>.pth` per process of a distributed run.
RNG_PATTERN = "rng_state*.pth"
# Where `ReGradTrainer` records the run's identity in trainer_state.json (its `RunIdentityCallback`'s state).
IDENTITY_CALLBACK = "RunIdentityCallback"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
_BLOCK = 4096
# What torch.load, safetensors and load_state_dict raise on a damaged or foreign file.
_LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, TypeError, IndexError, AttributeError,
                pickle.UnpicklingError, SafetensorError)  # fmt: skip


def encode_int8(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Signed values as int8 codes with one fp32 scale (absolute maximum / 127) per block of 4,096."""
    flat = values.detach().float().reshape(-1)
    padded = torch.zeros(-(-flat.numel() // _BLOCK) * _BLOCK)
    padded[: flat.numel()] = flat
    blocks = padded.view(-1, _BLOCK)
    scales = blocks.abs().amax(dim=1, keepdim=True) / 127
    codes = torch.where(scales > 0, blocks / scales.clamp_min(torch.finfo(torch.float32).tiny), 0.0).round()
    return {"codes": codes.to(torch.int8).reshape(-1)[: flat.numel()].contiguous(), "scales": scales.squeeze(1)}


def decode_int8(encoded: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Inverse of [`encode_int8`] (error <= half a block's scale)."""
    codes = encoded["codes"].float()
    return (codes * encoded["scales"][torch.arange(codes.numel()) // _BLOCK]).reshape(shape)


def factor_second_moment(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """A matrix of non-negative values as its row and column means in bf16 (Adafactor's factorisation; bf16 keeps
    the SmolLM2 state under 8 MB); other shapes whole."""
    values = values.detach().float()
    if values.dim() != 2:
        return {"whole": values.clone()}
    return {"rows": values.mean(dim=1).bfloat16(), "columns": values.mean(dim=0).bfloat16()}


def unfactor_second_moment(factored: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of [`factor_second_moment`]: exact for a rank-one matrix, the rank-one estimate otherwise."""
    if "whole" in factored:
        return factored["whole"]
    rows, columns = factored["rows"].float(), factored["columns"].float()
    total = rows.mean()
    return torch.outer(rows, columns) / total if total > 0 else torch.zeros(len(rows), len(columns))


def export_compact_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Writes the compact form of a `Trainer` checkpoint folder (see the module docstring) into `output_dir`.

    Args:
        checkpoint: a `checkpoint-N` folder written by [`ReGradTrainer`].
        output_dir: the target folder; it is replaced as a whole (written next to it, then swapped in under a
            journal: [`regrad_hf.files.swap_in`]), under its lock, so that exports into one folder wait for each other.

    Returns:
        `Path`: `output_dir`.

    Raises:
        [`ReGradValueError`] or [`ReGradFileError`]: `checkpoint` is not a complete full checkpoint (see
            [`check_checkpoint`]), or a file cannot be written (the previous `output_dir` is then as it was).
    """
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    check_checkpoint(checkpoint)
    if not (checkpoint / "optimizer.pt").is_file():
        raise ReGradValueError(f"{checkpoint} is not a full ReGradTrainer checkpoint (no optimizer.pt)")
    with load_errors(checkpoint / "optimizer.pt", "optimizer state"):
        optimizer = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
        tensors: dict[str, torch.Tensor] = {}
        for index, state in optimizer["state"].items():
            tensors[f"{index}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
            tensors[f"{index}.shape"] = torch.tensor(list(state["exp_avg_sq"].shape), dtype=torch.int64)
            for key, value in encode_int8(state["exp_avg"]).items():
                tensors[f"{index}.exp_avg.{key}"] = value
            for key, value in factor_second_moment(state["exp_avg_sq"]).items():
                tensors[f"{index}.exp_avg_sq.{key}"] = value
        metadata = {"param_groups": json.dumps(optimizer["param_groups"]), "format": "regrad-compact-adamw-2"}
    if output_dir.is_symlink() or (output_dir.exists() and not output_dir.is_dir()):
        raise ReGradFileError(f"cannot export a compact checkpoint to {output_dir}: it is not a folder")
    with exclusive_lock(output_dir):  # exports into one folder wait for each other; a killed one is repaired first
        repair_swap(output_dir, TRAINER_STATE_FILE)
        staging = None
        try:
            staging = staging_folder(output_dir)
            for path in [*(checkpoint / name for name in KEPT_FILES), *sorted(checkpoint.glob(RNG_PATTERN))]:
                shutil.copyfile(path, staging / path.name)
            atomic_save_safetensors(tensors, staging / COMPACT_OPTIMIZER_FILE, metadata=metadata)
            swap_in(staging, output_dir)  # journaled: a kill between its renames leaves the previous one to put back
        except BaseException as error:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(error, OSError) and not isinstance(error, ReGradError):
                raise write_error(error, output_dir) from error
            raise
    return output_dir


def is_compact_checkpoint(checkpoint: str | os.PathLike) -> bool:
    checkpoint = Path(checkpoint)
    return (checkpoint / COMPACT_OPTIMIZER_FILE).is_file() and not (checkpoint / "optimizer.pt").is_file()


@contextlib.contextmanager
def load_errors(path: Path, what: str) -> Iterator[None]:
    """Turns what torch, safetensors or `load_state_dict` raise on a damaged or foreign file into a
    [`ReGradValueError`] naming `path`."""
    try:
        yield
    except ReGradError:
        raise
    except _LOAD_ERRORS as error:
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise ReGradValueError(
            f"{path}: the {what} cannot be loaded ({type(error).__name__}: {reason}); resume from another checkpoint"
        ) from error


def load_compact_optimizer(optimizer: torch.optim.Optimizer, checkpoint: str | os.PathLike) -> None:
    """Loads `optimizer.safetensors` of a compact checkpoint into an AdamW `optimizer` over the same parameters.

    Raises:
        [`ReGradValueError`]: the file is damaged, holds non-finite moments, or does not fit `optimizer`.
    """
    path = Path(checkpoint) / COMPACT_OPTIMIZER_FILE
    with load_errors(path, "compact optimizer state"):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iter)
        if metadata.get("format") != "regrad-compact-adamw-2":
            found = metadata.get("format")
            raise ReGradValueError(f"{path} is not a compact ReGrad optimizer state (format {found!r})")
        groups = json.loads(metadata["param_groups"])
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        state = {}
        for index in sorted({int(key.split(".")[0]) for key in tensors}):
            shape = torch.Size(tensors[f"{index}.shape"].tolist())
            if not 0 <= index < len(parameters) or parameters[index].shape != shape:
                raise ReGradValueError(
                    f"{path} does not fit this optimizer's parameters (index {index}, shape {shape})"
                )
            moment = {key: tensors[f"{index}.exp_avg.{key}"] for key in ("codes", "scales")}
            prefix = f"{index}.exp_avg_sq."
            second = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
            state[index] = {
                "step": tensors[f"{index}.step"].reshape(()),
                "exp_avg": decode_int8(moment, shape),
                "exp_avg_sq": unfactor_second_moment(second).reshape(shape),
            }
            if not all(torch.isfinite(value).all() for value in state[index].values()):
                raise ReGradValueError(f"{path} holds non-finite optimizer moments (parameter {index}); it is damaged")
        optimizer.load_state_dict({"state": state, "param_groups": groups})


def check_checkpoint(checkpoint: str | os.PathLike) -> dict:
    """Checks a folder to resume from, before anything of it is loaded, and returns its trainer state.

    A checkpoint is complete when it holds the learner, the optimizer state (`optimizer.pt`, or the compact
    `optimizer.safetensors`), the scheduler, the RNG state and `trainer_state.json`, which `Trainer` writes last. A
    compact checkpoint whose re-export was killed between its two renames is first put back (see
    [`regrad_hf.files.swap_in`]), as the next export would.

    Raises:
        [`ReGradFileError`]: the folder does not exist, is not a folder, or it or a file in it is a symlink (a
            checkpoint never follows one).
        [`ReGradValueError`]: a file is missing (a run killed while saving it), or `trainer_state.json` is damaged.
    """
    folder = directory_argument(checkpoint, "resume_from_checkpoint")
    if not os.path.lexists(folder) and interrupted_backup(folder, TRAINER_STATE_FILE) is not None:
        with exclusive_lock(folder):  # an export killed between its two renames: put the previous one back
            repair_swap(folder, TRAINER_STATE_FILE)
    try:
        link = stat.S_ISLNK(os.lstat(folder).st_mode)
        entries = {} if link else {entry.name: entry for entry in os.scandir(folder)}
    except FileNotFoundError as error:
        raise ReGradFileError(f"cannot resume from {folder}: it does not exist") from error
    except NotADirectoryError as error:
        raise ReGradFileError(f"cannot resume from {folder}: it is a file, not a checkpoint folder") from error
    except OSError as error:
        raise ReGradFileError(f"cannot read {folder}: {error.strerror or error}") from error
    if link:
        raise ReGradFileError(f"{folder} is a symlink; a checkpoint is never followed through one")
    links = sorted(name for name, entry in entries.items() if entry.is_symlink())
    if links:
        raise ReGradFileError(f"{folder} holds symlinks {links}; a checkpoint never follows one: copy the files in")
    compact = COMPACT_OPTIMIZER_FILE in entries and "optimizer.pt" not in entries
    needed = (*KEPT_FILES, COMPACT_OPTIMIZER_FILE if compact else "optimizer.pt")
    missing = [name for name in needed if name not in entries or not entries[name].is_file()]
    if not any(fnmatch.fnmatch(name, RNG_PATTERN) for name in entries):
        missing.append(RNG_PATTERN)
    if missing:
        raise ReGradValueError(
            f"{folder} is not a complete ReGradTrainer checkpoint (missing {missing}; a run stopped while writing "
            "it leaves it so): resume from an earlier one"
        )
    state = read_trainer_state(folder / TRAINER_STATE_FILE)
    named = _CHECKPOINT_NAME.fullmatch(folder.name)
    if named and int(named.group(1)) != state["global_step"]:
        raise ReGradValueError(f"{folder} holds the state of step {state['global_step']}, not of its name's step")
    return state


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _callback_states(value: object) -> Iterable[object]:
    return value if isinstance(value, list) else [value]


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's `trainer_state.json`, checked field by field: `Trainer` would take a damaged one as it is
    (a step of -5 or 10**6, NaN, a list) and resume a wrong state, or fail with a bare `TypeError`.

    Raises:
        [`ReGradValueError`]: not a JSON object, an unknown field, or a field of the wrong type or range.
    """
    state = read_json_object(path, "trainer state")
    known = {item.name for item in dataclasses.fields(TrainerState)}
    counts = ("global_step", "max_steps", "num_train_epochs", "num_input_tokens_seen")
    # logging/eval/save steps: a float when given as one (`regrad train --save_steps 1` gives 1.0)
    numbers = ("epoch", "total_flos", "best_metric", "logging_steps", "eval_steps", "save_steps")
    problems = [f"unknown field {name!r}" for name in state if name not in known]
    problems += [] if "global_step" in state else ["no global_step"]
    problems += [f"{name} is not a count" for name in counts if name in state and not _is_count(state[name])]
    problems += [
        f"{name} is not a count or null"
        for name in ("train_batch_size", "best_global_step")
        if state.get(name) is not None and not _is_count(state[name])
    ]
    problems += [
        f"{name} is not a finite number"
        for name in numbers
        if state.get(name) is not None and not _is_number(state[name])
    ]
    history = state.get("log_history", [])
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        problems.append("log_history is not a list of objects")
    elif not all(_is_number(entry.get("wall_seconds", 0)) and _is_count(entry.get("step", 0)) for entry in history):
        problems.append("log_history has an entry whose step or wall_seconds is not a number")
    callbacks = state.get("stateful_callbacks") or {}
    control_fields = {item.name for item in dataclasses.fields(TrainerControl)}
    if not isinstance(callbacks, dict) or not all(
        isinstance(item, dict)
        and isinstance(item.get("args", {}), dict)
        and isinstance(item.get("attributes", {}), dict)
        for value in callbacks.values()
        for item in _callback_states(value)
    ):
        problems.append("stateful_callbacks is not an object of callback states")
    elif not all(
        set(item.get("args", {})) <= control_fields and all(isinstance(v, bool) for v in item.get("args", {}).values())
        for item in _callback_states(callbacks.get("TrainerControl", {}))
    ):
        problems.append("the TrainerControl state is not a set of flags")
    if not problems and state.get("max_steps", state["global_step"]) < state["global_step"]:
        problems.append(f"global_step {state['global_step']} is beyond max_steps {state['max_steps']}")
    if problems:
        raise ReGradValueError(f"{path} is not a usable trainer state: {'; '.join(problems)}")
    return state


def run_identity(args, tasks: Iterable | None) -> dict:
    """What fixes a run's data order and batches: its tasks (a sha256 over them, in order), seeds and batch layout.

    A resume skips the batches the checkpoint's run has seen; under another identity those are other batches."""
    digest = None
    if tasks is not None:
        hasher = hashlib.sha256()
        for task in tasks:
            hasher.update(json.dumps(task.to_dict(), sort_keys=True).encode("utf-8") + b"\n")
        digest = hasher.hexdigest()
    names = ("seed", "data_seed", "per_device_train_batch_size", "gradient_accumulation_steps", "world_size",
             "documents_per_task")  # fmt: skip
    return {**{name: getattr(args, name) for name in names}, "tasks_sha256": digest}


def check_run_identity(state: dict, identity: dict, checkpoint: str | os.PathLike) -> None:
    """Refuses to resume `checkpoint` (its trainer `state`) under another [`run_identity`] than the one that wrote
    it; checkpoints written before the identity was recorded are not checked.

    Raises:
        [`ReGradValueError`]: naming the fields that differ.
    """
    stored = (state.get("stateful_callbacks") or {}).get(IDENTITY_CALLBACK)
    if stored is None:
        return
    recorded = stored.get("args", {}).get("identity") if isinstance(stored, dict) else None
    if not isinstance(recorded, dict):
        raise ReGradValueError(f"{checkpoint}: its trainer_state.json has a damaged {IDENTITY_CALLBACK} entry")
    differing = sorted(name for name in {*recorded, *identity} if recorded.get(name) != identity.get(name))
    if differing:
        changes = ", ".join(f"{name} {recorded.get(name)!r} -> {identity.get(name)!r}" for name in differing)
        raise ReGradValueError(
            f"cannot resume {checkpoint}: it was written by a run with other {', '.join(differing)} ({changes}), so "
            "the batches it skips are not the ones it saw; resume with that run's arguments and tasks, or start a "
            "new run from its learner (regrad train --init_learner CHECKPOINT)"
        )


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete `checkpoint-N` folder of `output_dir` (see [`check_checkpoint`]), or `None`. Incomplete
    or damaged ones (a run killed while writing one) are skipped with a warning, so a resume takes the previous."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), path) for path in folder.iterdir() if (m := _CHECKPOINT_NAME.fullmatch(path.name))]
    for _, path in sorted(found, reverse=True):
        try:
            check_checkpoint(path)
        except ReGradError as error:
            logger.warning("skipping %s: %s", path, error)
            continue
        return str(path)
    return None

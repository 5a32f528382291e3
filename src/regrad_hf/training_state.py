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
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ReGradValueError
from .files import atomic_save_safetensors

COMPACT_OPTIMIZER_FILE = "optimizer.safetensors"
# What a compact checkpoint copies from a Trainer checkpoint unchanged.
KEPT_FILES = ("config.json", "learner.safetensors", "scheduler.pt", "trainer_state.json")
# RNG states: `rng_state.pth`, or one `rng_state_<rank>.pth` per process of a distributed run.
RNG_PATTERN = "rng_state*.pth"
_BLOCK = 4096


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
        output_dir: the target folder; it is replaced as a whole (written next to it, then renamed).

    Returns:
        `Path`: `output_dir`.
    """
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    missing = [name for name in (*KEPT_FILES, "optimizer.pt") if not (checkpoint / name).is_file()]
    rng_files = sorted(checkpoint.glob(RNG_PATTERN))
    if not rng_files:
        missing.append(RNG_PATTERN)
    if missing:
        raise ReGradValueError(f"{checkpoint} is not a complete ReGradTrainer checkpoint (missing {missing})")
    optimizer = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    tensors: dict[str, torch.Tensor] = {}
    for index, state in optimizer["state"].items():
        tensors[f"{index}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
        tensors[f"{index}.shape"] = torch.tensor(list(state["exp_avg_sq"].shape), dtype=torch.int64)
        for key, value in encode_int8(state["exp_avg"]).items():
            tensors[f"{index}.exp_avg.{key}"] = value
        for key, value in factor_second_moment(state["exp_avg_sq"]).items():
            tensors[f"{index}.exp_avg_sq.{key}"] = value
    staging = output_dir.with_name(f".{output_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in [*(checkpoint / name for name in KEPT_FILES), *rng_files]:
        shutil.copyfile(path, staging / path.name)
    metadata = {"param_groups": json.dumps(optimizer["param_groups"]), "format": "regrad-compact-adamw-2"}
    atomic_save_safetensors(tensors, staging / COMPACT_OPTIMIZER_FILE, metadata=metadata)
    previous = output_dir.with_name(f".{output_dir.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if output_dir.exists():
        output_dir.rename(previous)
    staging.rename(output_dir)
    shutil.rmtree(previous, ignore_errors=True)
    return output_dir


def is_compact_checkpoint(checkpoint: str | os.PathLike) -> bool:
    checkpoint = Path(checkpoint)
    return (checkpoint / COMPACT_OPTIMIZER_FILE).is_file() and not (checkpoint / "optimizer.pt").is_file()


def load_compact_optimizer(optimizer: torch.optim.Optimizer, checkpoint: str | os.PathLike) -> None:
    """Loads `optimizer.safetensors` of a compact checkpoint into an AdamW `optimizer` over the same parameters."""
    path = Path(checkpoint) / COMPACT_OPTIMIZER_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iter)
    if metadata.get("format") != "regrad-compact-adamw-2":
        raise ReGradValueError(f"{path} is not a compact ReGrad optimizer state (format {metadata.get('format')!r})")
    groups = json.loads(metadata["param_groups"])
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index in sorted({int(key.split(".")[0]) for key in tensors}):
        shape = torch.Size(tensors[f"{index}.shape"].tolist())
        if index >= len(parameters) or parameters[index].shape != shape:
            raise ReGradValueError(f"{path} does not fit this optimizer's parameters (index {index}, shape {shape})")
        moment = {key: tensors[f"{index}.exp_avg.{key}"] for key in ("codes", "scales")}
        prefix = f"{index}.exp_avg_sq."
        second = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        state[index] = {
            "step": tensors[f"{index}.step"].reshape(()),
            "exp_avg": decode_int8(moment, shape),
            "exp_avg_sq": unfactor_second_moment(second).reshape(shape),
        }
    optimizer.load_state_dict({"state": state, "param_groups": groups})

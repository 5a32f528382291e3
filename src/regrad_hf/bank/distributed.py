"""The few `torch.distributed` calls a multi-process bank build needs, and nothing when there is one process.

A build runs under any launcher that initialises the default process group (`torchrun`, `accelerate launch`, or
the user's own `init_process_group`): [`process_rank`] says which process this is, [`everyone`] runs a step on every
process and waits for all of them, so that one process failing makes every process raise instead of the others
waiting forever in the next collective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from ..errors import ReGradError

T = TypeVar("T")


def process_rank() -> tuple[int, int]:
    """This process's rank and the number of processes: `(0, 1)` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo (and the others) CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def everyone(step: Callable[[], T], what: str) -> T:
    """Runs `step` here, then waits for every process to have run its own.

    Args:
        step (`Callable`): this process's part.
        what (`str`): the step's name, for the error raised on the processes where it did not fail.

    Returns:
        what `step` returned.

    Raises:
        whatever `step` raised on this process; [`ReGradError`] naming the failed processes on the others.
    """
    rank, world = process_rank()
    if world == 1:
        return step()
    error: BaseException | None = None
    try:
        result = step()
    except Exception as caught:  # re-raised below, after the others know
        error = caught
    failed = torch.zeros(world, dtype=torch.int32, device=_device())
    failed[rank] = error is not None
    dist.all_reduce(failed)
    if error is not None:
        raise error
    failed_ranks = failed.nonzero().flatten().tolist()
    if failed_ranks:
        raise ReGradError(f"{what} failed on process(es) {failed_ranks}: see their errors")
    return result


def broadcast_flags(flags: Sequence[bool], count: int) -> list[bool]:
    """Process 0's `count` `flags`, on every process (`flags` is ignored on the others)."""
    rank, world = process_rank()
    if world == 1:
        return list(flags)
    tensor = torch.zeros(count, dtype=torch.uint8, device=_device())
    if rank == 0:
        tensor.copy_(torch.tensor(list(flags), dtype=torch.uint8))
    dist.broadcast(tensor, src=0)
    return [bool(flag) for flag in tensor.tolist()]

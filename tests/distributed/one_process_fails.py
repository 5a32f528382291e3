"""Run by tests/bank/test_distributed.py under `torchrun --nproc_per_node 2`: process 1 fails inside `everyone`; each
process prints what it raised, and both must then get through the next collective instead of hanging."""

import torch.distributed as dist

from regrad_hf.bank.distributed import broadcast_flags, everyone, process_rank


def step() -> str:
    if process_rank()[0] == 1:
        raise ValueError("process 1 cannot read its documents")
    return "done"


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = process_rank()
    try:
        everyone(step, "computing")
    except Exception as error:  # noqa: BLE001 - printed for the test to check
        print(f"rank {rank} raised {type(error).__name__}: {error}", flush=True)
    flags = broadcast_flags([True, False, True] if rank == 0 else [], 3)
    print(f"rank {rank} of {world} got {flags}", flush=True)
    dist.destroy_process_group()

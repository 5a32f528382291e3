"""Run by tests/bank/test_distributed.py under `torchrun --nproc_per_node 2` with an empty $REGRAD_HF_CACHE: both
processes ask for the embedded model at once (a distributed run on a fresh machine); each prints what it got."""

import torch.distributed as dist
from transformers import AutoConfig

from regrad_hf.bank.distributed import process_rank
from regrad_hf.defaults import embedded_model_path

if __name__ == "__main__":
    dist.init_process_group("gloo")  # transformers' save_pretrained writes nothing on rank 1 from here on
    rank, _ = process_rank()
    path = embedded_model_path()
    files = sorted(p.name for p in path.iterdir())
    print(f"rank {rank} got {path.name} {AutoConfig.from_pretrained(path).model_type} {files}", flush=True)
    dist.destroy_process_group()

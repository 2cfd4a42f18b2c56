"""Process-group start-up and per-rank seeding, shared by pretraining and fine-tuning ranks."""

from __future__ import annotations

import os
import random
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed: NCCL on GPUs, gloo on CPU. Works under torchrun, the
    deepspeed launcher, or a bare process (then it is a world of one). ``timeout_s`` (``train.collective_timeout_s``)
    bounds every collective: one still waiting on a dead or hung rank after that long raises on the waiting ranks.
    A process group that already exists is kept as it is (with the timeout it was created with)."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> int:
    """torch's intra-op threads: ``threads``, else the machine's cores shared evenly by the ranks of this node
    (``LOCAL_WORLD_SIZE``). Returns the number set."""
    n = threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(n)
    return n

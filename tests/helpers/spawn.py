"""Run a function on N real gloo ranks (``torch.multiprocessing.spawn``) and collect what each rank saved.

``fn(rank, world, *args)`` runs inside an initialised process group (1 thread per rank); its return value
(tensors, numbers, strings and lists / tuples / dicts of them) is saved with ``torch.save``, read back with
``weights_only=True`` and returned here, one entry per rank. Pickled by
reference, so ``fn`` must be a module-level function of an importable module (a test file is fine).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn: Callable[..., Any], *args: Any, world: int = 2) -> list[Any]:
    """``[fn(0, world, *args), ..., fn(world-1, world, *args)]``, each computed on its own gloo rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world, _free_port(), out_dir, fn, args), nprocs=world, join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world)]

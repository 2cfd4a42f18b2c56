"""What every benchmark measures the same way, on whatever device is there: the device, clocks read after the
device finished (CUDA runs asynchronously: a host clock alone times the launches), the device's measured matmul
peak (the denominator of MFU), FLOPs of a step (counted by ``torch.utils.flop_counter``), and peak memory (host
RSS and, on CUDA, ``torch.cuda.max_memory_allocated``); and the checks of the counts every benchmark takes."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

PEAK_SIZES = {"cuda": 8192, "cpu": 1024}  # square matmul side for the peak measurement


def bench_device() -> torch.device:
    """CUDA when there is a GPU (every framework of a comparison runs there), else the CPU; DeepSpeed is told to use
    its CPU accelerator only in the second case."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``fn()`` takes, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def matmul_peak(device: torch.device, dtype: torch.dtype, *, seconds: float = 1.0) -> float:
    """FLOP/s of a square ``dtype`` matmul on ``device`` (the best of several timed batches), measured now: the
    ceiling a model step's matmuls can reach on this machine at this moment (2 cores shared with other work, or a
    GPU's tensor cores)."""
    n = PEAK_SIZES[device.type]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up (kernel selection, allocation)
    best, spent, reps = 0.0, 0.0, 1
    while spent < seconds:
        elapsed = timed(lambda reps=reps: [a @ b for _ in range(reps)], device)
        spent += elapsed
        best = max(best, 2 * n**3 * reps / elapsed)
        reps = min(reps * 2, 64)
    return best


def step_flops(step: Callable[[], Any]) -> int:
    """FLOPs one call of ``step`` (forward + backward + update) performs, counted by ``FlopCounterMode`` (matmuls,
    convolutions and attention; elementwise work is not counted, as in the MFU convention of PaLM / open_clip)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def peak_memory(device: torch.device) -> dict[str, float | None]:
    """Peak host RSS of this process (MB) and, on CUDA, the peak of ``torch.cuda.max_memory_allocated`` (MB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": round(rss, 1), "peak_device_mb": round(gpu, 1) if gpu is not None else None}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def check_counts(args: Any, positive: Sequence[str], trials: str | None = "trials") -> None:
    """One-line errors for a benchmark's count options: each of ``positive`` at least 1, ``trials`` (when named)
    at least 2 (the first trial is warm-up)."""
    from mmssl.tools.errors import ToolError

    if trials is not None and getattr(args, trials) < 2:
        raise ToolError(f"--{trials} must be >= 2 (the first is warm-up), got {getattr(args, trials)}")
    for key in positive:
        if getattr(args, key) < 1:
            raise ToolError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")

"""Collectives for losses: all-gather with gradient, and plain reductions.

`gather_with_grad` concatenates a tensor from every rank along dim 0. Its backward sums the incoming gradients
over ranks (all-reduce) and returns this rank's slice, i.e. ``d(Σ_k L_k)/d x_r``. If every rank computes its own
loss ``L_k`` from the gathered tensor and the data-parallel engine averages parameter gradients over ranks (as
DeepSpeed does), each parameter receives ``d(mean_k L_k)/dθ`` — the gradient of the global loss — exactly as if
one process had seen the whole global batch. Works on gloo (CPU) and NCCL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        rank, size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """``cat([x_0, ..., x_{W-1}])`` over ranks, differentiable; identity on a single process.
    Every rank must pass the same shape."""
    if world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


_HOST_GROUP: list[Any] = []  # the gloo group for host values under a device backend (created on first use)


def host_all_gather(values: Sequence[int]) -> list[list[int]]:
    """Every rank's ``values`` (a few host integers: sequence lengths, counts), in rank order, exchanged on the
    host over gloo: the default group when it is gloo, else a gloo group made once beside it (collectively, on
    first use by every rank), so under NCCL the exchange never waits for the device."""
    size = world()[1]
    if size == 1:
        return [list(values)]
    if not _HOST_GROUP:
        _HOST_GROUP.append(None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))
    local = torch.tensor(list(values), dtype=torch.long)
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local, group=_HOST_GROUP[0])
    return [p.tolist() for p in parts]


def gather_no_grad(x: Tensor) -> Tensor:
    if world()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world()[1])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_rows(x: Tensor) -> Tensor:
    """``cat([x_0, ..., x_{W-1}])`` over ranks without gradient, where ranks may hold different numbers of rows
    (padded to the largest for the collective, then trimmed)."""
    _, size = world()
    if size == 1:
        return x
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    most = int(max(int(c) for c in counts))
    padded = torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])]) if x.shape[0] < most else x
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts, strict=True)])


def gather_keyed_rows(keys: list[str], rows: Tensor) -> tuple[list[str], Tensor]:
    """Sample keys and their rows ``[n_r, D]`` from every rank, in rank order (uneven ``n_r`` allowed)."""
    _, size = world()
    if size == 1:
        return list(keys), rows
    all_keys: list[list[str]] = [[] for _ in range(size)]
    dist.all_gather_object(all_keys, list(keys))
    return [k for ks in all_keys for k in ks], gather_rows(rows)


def sum_over_ranks(x: Tensor, enabled: bool = True) -> Tensor:
    """A detached copy of ``x`` summed over ranks (counts that normalise a global mean); ``x`` itself when
    ``enabled`` is False or there is one process."""
    x = x.detach().clone()
    if enabled and world()[1] > 1:
        dist.all_reduce(x)
    return x

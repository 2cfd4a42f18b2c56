"""Collectives for losses: all-gather with gradient, and plain reductions.

`gather_with_grad` concatenates a tensor from every rank along dim 0. Its backward sums the incoming gradients
over ranks (all-reduce) and returns this rank's slice, i.e. ``d(Σ_k L_k)/d x_r``. If every rank computes its own
loss ``L_k`` from the gathered tensor and the data-parallel engine averages parameter gradients over ranks (as
DeepSpeed does), each parameter receives ``d(mean_k L_k)/dθ`` — the gradient of the global loss — exactly as if
one process had seen the whole global batch. Works on gloo (CPU) and NCCL.
"""

from __future__ import annotations

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


def gather_no_grad(x: Tensor) -> Tensor:
    if world()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world()[1])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)

"""Sinkhorn-Knopp equipartitioned soft assignment (Cuturi 2013; SeLa, Asano et al. 2020; SwAV, Caron et al. 2020).

Given scores ``S ∈ R^{N×K}`` of N samples (the global batch) against K prototypes and an entropic regulariser ε,
the codes ``Q`` solve ``max_Q Tr(Qᵀ S) + ε H(Q)`` over the transportation polytope whose prototype marginals are
uniform. SwAV's ``distributed_sinkhorn`` alternates, starting from ``Q = exp(S/ε)`` (written here with Q as N×K)::

    repeat n_iters times:
        Q[:, k] ← Q[:, k] / Σ_i Q[i, k]          (each prototype gets equal mass; the sum runs over ALL ranks)
        Q[i, :] ← Q[i, :] / Σ_k Q[i, k]          (each sample's code is a distribution over prototypes)

(SwAV's extra ``/K``, ``/B`` and final ``·B`` factors cancel against the next normalisation.) The result has rows
summing to 1 exactly and prototype masses ``Σ_i Q[i, k] → N/K`` as ``n_iters`` grows (SwAV uses 3 iterations).

Numerics: the iteration runs on ``log Q`` with log-sum-exp normalisations (the prototype one over ranks: an
all-reduce MAX then an all-reduce SUM of ``exp(log Q - max)``), so no score range overflows or underflows to an
all-zero prototype; all-equal scores give ``Q = 1/K`` everywhere. Rows with ``valid = False`` (an absent
modality) take no part in either marginal and get a zero code; N counts valid rows over all ranks.

`swav_loss` (SwAV's swapped prediction, formula in `objectives.clustering`) is the pure function form of
`objectives.clustering.SwapClusteringObjective`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from mmssl.objectives.distributed import sum_over_ranks, world


def _all_reduce(x: Tensor, op: dist.ReduceOp.RedOpType) -> Tensor:
    if world()[1] > 1:
        dist.all_reduce(x, op=op)
    return x


def _logsumexp_over_rows(logq: Tensor, gather: bool) -> Tensor:
    """``log Σ_i exp(logq[i, k])`` over the rows of every rank: ``[1, K]``."""
    m = torch.cat([logq, logq.new_full((1, logq.shape[1]), float("-inf"))]).amax(dim=0, keepdim=True)  # 0 rows ok
    if gather:
        m = _all_reduce(m.contiguous(), dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(logq - m).sum(dim=0, keepdim=True)
    if gather:
        s = _all_reduce(s, dist.ReduceOp.SUM)
    return m + torch.log(s)


@torch.no_grad()
def sinkhorn(
    scores: Tensor,
    epsilon: float = 0.05,
    n_iters: int = 3,
    *,
    valid: Tensor | None = None,
    gather: bool = True,
) -> Tensor:
    """Balanced codes ``Q [B, K]`` for this rank's rows of the global batch (see the module docstring).

    Args:
        scores: ``[B, K]`` sample-prototype scores on this rank (cosine similarities in SwAV); not differentiated.
        epsilon: entropic regulariser ε (SwAV: 0.05).
        n_iters: Sinkhorn-Knopp iterations, each a prototype then a sample normalisation.
        valid: ``bool[B]``, rows that take part; ``None`` means all.
        gather: balance prototypes over the rows of every rank (SwAV's distributed form); otherwise this rank's.

    Returns:
        ``[B, K]`` codes in float32 (float64 for float64 scores); each valid row sums to 1, invalid rows are 0.
        Every rank must call it (with its own rows) when ``gather`` and a process group is initialised.
    """
    if not epsilon > 0:
        raise ValueError(f"sinkhorn epsilon must be > 0, got {epsilon}")
    if n_iters < 1:
        raise ValueError(f"sinkhorn n_iters must be >= 1, got {n_iters}")
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    logq = scores.detach().to(dtype) / epsilon
    gather = gather and world()[1] > 1
    if valid is None:
        valid = torch.ones(logq.shape[0], dtype=torch.bool, device=scores.device)
    valid = valid.to(device=scores.device, dtype=torch.bool)
    count = valid.sum().to(dtype).reshape(1)
    if gather:  # every rank makes the same collectives, whatever its rows
        count = _all_reduce(count, dist.ReduceOp.SUM)
    if float(count) == 0:
        return torch.zeros_like(logq)
    dead = ~valid.unsqueeze(1)
    logq = logq.masked_fill(dead, float("-inf"))
    for _ in range(n_iters):
        logq = logq - _logsumexp_over_rows(logq, gather)
        logq = (logq - torch.logsumexp(logq, dim=1, keepdim=True)).masked_fill(dead, float("-inf"))
    return torch.exp(logq)


def swav_loss(za: Tensor, zb: Tensor, prototypes: Tensor, *, temperature: float = 0.1, epsilon: float = 0.05,
              sinkhorn_iters: int = 3, valid: Tensor | None = None,
              gather: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """Swapped prediction between two modalities/views (see the module docstring).

    Args:
        za, zb: ``[B, E]`` embeddings on this rank (normalised here); prototypes: ``[K, E]`` (normalised here).
        valid: ``bool[B]`` rows with both present; ``None``: all. gather: codes balanced over all ranks.

    Returns:
        This rank's loss ``W/N_global · Σ_local`` (mean over ranks = L) and detached metrics.
    """
    rank_size = world()[1] if gather else 1
    if valid is None:
        valid = torch.ones(za.shape[0], dtype=torch.bool, device=za.device)
    valid = valid.bool()
    dead = ~valid.unsqueeze(1)
    dtype = torch.float64 if za.dtype == torch.float64 else torch.float32  # bf16 inputs are computed in fp32
    za = F.normalize(za.to(dtype).masked_fill(dead, 0.0), dim=1)
    zb = F.normalize(zb.to(dtype).masked_fill(dead, 0.0), dim=1)
    c = F.normalize(prototypes.to(dtype), dim=1)
    sa, sb = za @ c.T, zb @ c.T
    qa = sinkhorn(sa, epsilon, sinkhorn_iters, valid=valid, gather=gather)
    qb = sinkhorn(sb, epsilon, sinkhorn_iters, valid=valid, gather=gather)
    la, lb = F.log_softmax(sa / temperature, dim=1), F.log_softmax(sb / temperature, dim=1)
    per_row = -0.5 * ((qb * la).sum(1) + (qa * lb).sum(1))
    n_global = sum_over_ranks(valid.sum().float(), gather)
    loss = per_row.masked_fill(~valid, 0.0).sum() * rank_size / n_global.clamp_min(1)
    with torch.no_grad():
        v = valid
        agree = ((sa.argmax(1) == qb.argmax(1)) & v).sum() + ((sb.argmax(1) == qa.argmax(1)) & v).sum()
        usage = qa[v].argmax(1).unique().numel() / prototypes.shape[0] if v.any() else 0.0
        metrics = {"swap_acc": agree.float() / (2 * v.sum()).clamp_min(1), "usage": sa.new_tensor(usage)}
    return loss, metrics

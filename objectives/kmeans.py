"""k-means in torch for pseudo-label services (DeepCluster, Caron et al. 2018; XDC, Alwassel et al. 2020).

Minimises the inertia ``Σ_i ||x_i - c_{a(i)}||²`` over centroids ``c_1..c_K`` and assignments ``a(i)`` by Lloyd's
iterations (Lloyd 1982)::

    a(i) = argmin_k ||x_i - c_k||²            (assignment; ties go to the lowest k)
    c_k  = mean{x_i : a(i) = k}               (update; spherical: c_k = normalise(mean), x_i normalised first)

from a greedy k-means++ initialisation (Arthur & Vassilvitskii 2007; the greedy variant with ``2 + ⌊ln K⌋``
candidates per centroid, as in scikit-learn), drawn from a ``torch.Generator`` seeded with ``seed``: the same
inputs and seed give the same result on every process.

Loop semantics follow scikit-learn's ``KMeans(algorithm="lloyd", tol=0)``: at most ``iters`` updates, stopping
early when an assignment repeats the previous one, then a final assignment to the returned centroids.

Empty clusters: after every assignment, each empty cluster takes the point farthest from its own centroid among
the points whose cluster has at least two members (scikit-learn's relocation rule, applied to the labels as well
as to the centroid sums), and the centroid of that cluster becomes that point. The final assignment is repaired
the same way, so with ``N ≥ K`` points no returned cluster is empty, even when points are duplicated and ``K``
exceeds the number of distinct points (a repaired point is then at distance 0 from its new centroid).

Distances ``||x||² - 2 x·c + ||c||²`` are computed in row chunks of ``chunk_elems / K`` points, so memory is
``O(N·D + chunk_elems)``, never ``N×K×D`` (N=100k, D=256, K=1000 uses a few hundred MB in float32). Centroid sums
use ``index_add_`` on CPU and a chunked one-hot matmul elsewhere (CUDA's ``index_add_`` is not deterministic).

Also here: `normalized_mutual_info` (between two
clusterings, for the pseudo-label services' logs).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CHUNK_ELEMS = 1 << 24  # distance-matrix elements per chunk (64 MB in float32)


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _assign(x: Tensor, c: Tensor, x_sq: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Nearest centroid per row and its squared distance, in row chunks."""
    c_sq = (c * c).sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    d2 = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], chunk):
        d = torch.addmm(c_sq.unsqueeze(0), x[s : s + chunk], c.T, alpha=-2.0) + x_sq[s : s + chunk, None]
        best, idx = d.min(dim=1)
        labels[s : s + chunk] = idx
        d2[s : s + chunk] = best.clamp_min(0)
    return labels, d2


def _sums(x: Tensor, labels: Tensor, k: int, chunk: int) -> Tensor:
    """Per-cluster sums of the rows of ``x`` (deterministic on every device)."""
    if x.device.type == "cpu":
        return torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    out = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], chunk):
        onehot = F.one_hot(labels[s : s + chunk], k).to(x.dtype)
        out += onehot.T @ x[s : s + chunk]
    return out


def _fill_empty(labels: Tensor, d2: Tensor, k: int) -> tuple[Tensor, list[tuple[int, int, int]]]:
    """Give each empty cluster the farthest point (from its own centroid) of a cluster with >= 2 members.
    Returns the repaired labels and the ``(point, from cluster, to cluster)`` moves."""
    counts = torch.bincount(labels, minlength=k)
    empty = (counts == 0).nonzero().squeeze(1).tolist()
    if not empty:
        return labels, []
    labels = labels.clone()
    counts_l = counts.tolist()
    order = torch.argsort(d2, descending=True, stable=True).tolist()
    label_l = labels.tolist()
    moves: list[tuple[int, int, int]] = []
    pos = 0
    for j in empty:
        while pos < len(order) and counts_l[label_l[order[pos]]] < 2:
            pos += 1
        if pos == len(order):  # fewer points than clusters: nothing left to give
            break
        i = order[pos]
        pos += 1
        moves.append((i, label_l[i], j))
        counts_l[label_l[i]] -= 1
        counts_l[j] = 1
        label_l[i] = j
    idx = torch.tensor([i for i, _, _ in moves], dtype=torch.long, device=labels.device)
    labels[idx] = torch.tensor([j for _, _, j in moves], dtype=torch.long, device=labels.device)
    return labels, moves


def _centroids(x: Tensor, labels: Tensor, k: int, spherical: bool, chunk: int) -> Tensor:
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    c = _sums(x, labels, k, chunk) / counts.clamp_min(1).unsqueeze(1)
    return F.normalize(c, dim=1) if spherical else c


def kmeans_plusplus(x: Tensor, k: int, generator: torch.Generator, n_local_trials: int | None = None) -> Tensor:
    """Greedy k-means++ seeding: ``[K, D]`` rows of ``x``. Each new centroid is the best (lowest potential) of
    ``n_local_trials`` candidates drawn with probability ∝ squared distance to the nearest chosen centroid; when
    every point coincides with a chosen centroid, candidates are drawn uniformly."""
    n = x.shape[0]
    trials = n_local_trials or 2 + int(math.log(k))
    x_sq = (x * x).sum(1)

    def sq_dist(rows: Tensor) -> Tensor:  # [N, len(rows)]
        c = x[rows]
        return torch.addmm((c * c).sum(1).unsqueeze(0), x, c.T, alpha=-2.0).add_(x_sq[:, None]).clamp_min_(0)

    first = torch.randint(n, (1,), generator=generator).to(x.device)
    chosen = [first]
    closest = sq_dist(first).squeeze(1)
    for _ in range(1, k):
        cum = torch.cumsum(closest.double(), 0)
        total = float(cum[-1])
        if total > 0:
            r = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device) * total
            cand = torch.searchsorted(cum, r, right=True).clamp_max(n - 1)
        else:
            cand = torch.randint(n, (trials,), generator=generator).to(x.device)
        new_closest = torch.minimum(closest.unsqueeze(1), sq_dist(cand))
        best = int(torch.argmin(new_closest.double().sum(0)))
        closest = new_closest[:, best]
        chosen.append(cand[best : best + 1])
    return x[torch.cat(chosen)].clone()


def kmeans(
    x: Tensor,
    k: int,
    iters: int = 20,
    seed: int = 0,
    spherical: bool = False,
    *,
    init: Tensor | None = None,
    n_local_trials: int | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Lloyd's k-means (see the module docstring).

    Args:
        x: ``[N, D]`` points (any float dtype; computed in float64 if given float64, else float32).
        k: number of clusters, ``1 <= k <= N``.
        iters: maximum number of centroid updates.
        seed: seeds the k-means++ draw (ignored when ``init`` is given).
        spherical: cluster L2-normalised points with L2-normalised centroids (cosine k-means).
        init: ``[K, D]`` initial centroids instead of k-means++ (normalised here when ``spherical``).
        chunk_elems: distance-matrix elements computed at once.

    Returns:
        ``(centroids [K, D], assign [N] long, info)`` with ``info``: ``inertia`` (float, ``Σ ||x_i - c_a(i)||²`` of
        the returned, possibly normalised, points), ``iterations`` (updates made), ``converged`` (an assignment
        repeated), ``counts`` (``[K]`` cluster sizes), ``reseeded`` (empty clusters repaired, all iterations),
        ``init`` (the initial centroids).
    """
    if x.ndim != 2:
        raise ValueError(f"kmeans needs [N, D] points, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= N, got k={k} for N={n} points")
    if iters < 0:
        raise ValueError(f"kmeans iters must be >= 0, got {iters}")
    x = x.detach().to(_work_dtype(x))
    if spherical:
        x = F.normalize(x, dim=1)
    chunk = max(1, chunk_elems // k)
    if init is None:
        c = kmeans_plusplus(x, k, torch.Generator().manual_seed(seed), n_local_trials)
    else:
        if tuple(init.shape) != (k, x.shape[1]):
            raise ValueError(f"kmeans init must have shape {(k, x.shape[1])}, got {tuple(init.shape)}")
        c = init.detach().to(device=x.device, dtype=x.dtype).clone()
        if spherical:
            c = F.normalize(c, dim=1)
    c_init = c.clone()
    x_sq = (x * x).sum(1)
    prev: Tensor | None = None
    reseeded, done, converged = 0, 0, False
    for _ in range(iters):
        labels, d2 = _assign(x, c, x_sq, chunk)
        labels, moves = _fill_empty(labels, d2, k)
        reseeded += len(moves)
        if prev is not None and torch.equal(labels, prev):
            converged = True
            break
        c = _centroids(x, labels, k, spherical, chunk)
        prev = labels
        done += 1
    labels, d2 = _assign(x, c, x_sq, chunk)
    labels, moves = _fill_empty(labels, d2, k)
    if moves:  # the repaired clusters' centroids are their new points; donors lose them
        reseeded += len(moves)
        touched = torch.tensor(sorted({a for _, a, _ in moves} | {b for _, _, b in moves}), device=x.device)
        fresh = _centroids(x, labels, k, spherical, chunk)
        c[touched] = fresh[touched]
    inertia = 0.0
    for s in range(0, n, chunk):
        inertia += float(((x[s : s + chunk] - c[labels[s : s + chunk]]) ** 2).sum(dtype=torch.float64))
    info = {"inertia": inertia, "iterations": done, "converged": converged,
            "counts": torch.bincount(labels, minlength=k).cpu(), "reseeded": reseeded, "init": c_init}
    return c, labels, info


def normalized_mutual_info(a: Tensor, b: Tensor) -> float:
    """NMI with arithmetic-mean normalisation, ``2 I(a;b) / (H(a) + H(b))`` (scikit-learn's default)."""
    a, b = a.long().cpu(), b.long().cpu()
    _, a = torch.unique(a, return_inverse=True)
    _, b = torch.unique(b, return_inverse=True)
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    joint = torch.bincount(a * kb + b, minlength=ka * kb).double().reshape(ka, kb) / a.numel()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * (joint[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum())
    ha, hb = float(-(pa * pa.log()).sum()), float(-(pb * pb.log()).sum())
    return 1.0 if ha + hb == 0 else 2 * mi / (ha + hb)

"""Cross-modal retrieval Recall@K, chunked so an N x N similarity matrix is never materialised.

For query ``i`` with positive set ``P_i`` (gallery items of the same group; by default only item ``i``), the
rank of the first positive is ``r_i = #{j ∉ P_i : s_ij > max_{p ∈ P_i} s_ip}`` with ``s`` the cosine
similarity, and ``Recall@K = mean_i [r_i < K]``. Two passes over gallery chunks (the best positive score, then
the count of non-positives above it) keep memory at ``query_chunk x gallery_chunk``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def first_positive_rank(query: Tensor, gallery: Tensor, query_groups: Tensor, gallery_groups: Tensor, *,
                        chunk: int = 4096) -> Tensor:
    """``r_i`` for every query (see the module docstring); groups are integer ids."""
    q = F.normalize(query.float(), dim=-1)
    g = F.normalize(gallery.float(), dim=-1)
    ranks = torch.empty(q.shape[0], dtype=torch.long)
    for qs in range(0, q.shape[0], chunk):
        qc, qg = q[qs : qs + chunk], query_groups[qs : qs + chunk]
        best = torch.full((qc.shape[0],), float("-inf"))
        for gs in range(0, g.shape[0], chunk):
            sims = qc @ g[gs : gs + chunk].T
            positive = qg[:, None] == gallery_groups[None, gs : gs + chunk]
            best = torch.maximum(best, sims.masked_fill(~positive, float("-inf")).amax(1))
        if torch.isinf(best).any():
            raise ValueError("a query has no positive in the gallery")
        above = torch.zeros(qc.shape[0], dtype=torch.long)
        for gs in range(0, g.shape[0], chunk):
            sims = qc @ g[gs : gs + chunk].T
            positive = qg[:, None] == gallery_groups[None, gs : gs + chunk]
            above += ((sims > best[:, None]) & ~positive).sum(1)
        ranks[qs : qs + chunk] = above
    return ranks


def recall_at_k(ranks: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    return {f"R@{k}": float((ranks < k).double().mean()) for k in ks}


def group_ids(values: Sequence[object]) -> Tensor:
    """Integer ids such that equal values share an id (e.g. identical transcripts are mutual positives)."""
    index: dict[object, int] = {}
    return torch.tensor([index.setdefault(v, len(index)) for v in values])

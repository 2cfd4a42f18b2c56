"""Cross-modal retrieval Recall@K, chunked so an N x N similarity matrix is never materialised.

For query ``i`` with positive set ``P_i`` (gallery items of the same group; by default only item ``i``), the
rank of the first positive is ``r_i = #{j ∉ P_i : s_ij ≥ max_{p ∈ P_i} s_ip}`` with ``s`` the cosine
similarity, and ``Recall@K = mean_i [r_i < K]``. Ties go against the query (a non-positive scoring as high
as the best positive ranks above it), so a degenerate embedding (every item equal, e.g. a corrupted input
reduced to an empty string) retrieves nothing rather than everything. Similarities are computed in float64 and
"as high" means within ``TIE_TOL`` = 1e-9: a matrix product may score two identical gallery rows a few ulps
apart (different kernel paths), which must still count as a tie; float64 rounding stays far below it. Two
passes over gallery chunks (the best positive score, then the count of non-positives at or above it) keep memory
at ``query_chunk x gallery_chunk``.

`topk_chunked` keeps a running top-k per query over gallery chunks (memory ``chunk x (chunk + k)``).
`rerank_recall` is the two-stage protocol of ALBEF / BLIP (Li et al., 2021; Li et al., 2022): the cosine top-k
candidates of every query are re-scored by a pair scorer (an image-text matching head), re-ordered by that score
(ties keep the cosine order), and Recall@K is read from the new order for ``K ≤ k``. A query whose positives all
fall outside the cosine top-k cannot be recovered by re-ranking: it counts as a miss (rank ``k``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmssl.tools.errors import ToolError

PairScorer = Callable[[Tensor, Tensor], Tensor]
TIE_TOL = 1e-9  # similarities this close to the best positive count as ties (against the query)


def first_positive_rank(query: Tensor, gallery: Tensor, query_groups: Tensor, gallery_groups: Tensor, *,
                        chunk: int = 4096) -> Tensor:
    """``r_i`` for every query (see the module docstring); groups are integer ids."""
    q = F.normalize(query.double(), dim=-1)
    g = F.normalize(gallery.double(), dim=-1)
    query_groups, gallery_groups = query_groups.to(q.device), gallery_groups.to(q.device)
    ranks = torch.empty(q.shape[0], dtype=torch.long)
    for qs in range(0, q.shape[0], chunk):
        qc, qg = q[qs : qs + chunk], query_groups[qs : qs + chunk]
        best = torch.full((qc.shape[0],), float("-inf"), dtype=q.dtype, device=q.device)
        for gs in range(0, g.shape[0], chunk):
            sims = qc @ g[gs : gs + chunk].T
            positive = qg[:, None] == gallery_groups[None, gs : gs + chunk]
            best = torch.maximum(best, sims.masked_fill(~positive, float("-inf")).amax(1))
        if torch.isinf(best).any():
            raise ValueError("a query has no positive in the gallery")
        above = torch.zeros(qc.shape[0], dtype=torch.long, device=q.device)
        for gs in range(0, g.shape[0], chunk):
            sims = qc @ g[gs : gs + chunk].T
            positive = qg[:, None] == gallery_groups[None, gs : gs + chunk]
            above += ((sims >= best[:, None] - TIE_TOL) & ~positive).sum(1)
        ranks[qs : qs + chunk] = above.cpu()
    return ranks


def recall_at_k(ranks: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    return {f"R@{k}": float((ranks < k).double().mean()) for k in ks}


def group_ids(values: Sequence[object]) -> Tensor:
    """Integer ids such that equal values share an id (e.g. identical transcripts are mutual positives)."""
    index: dict[object, int] = {}
    return torch.tensor([index.setdefault(v, len(index)) for v in values])


def recall_both_ways(q: Tensor, t: Tensor, groups: Tensor, names: tuple[str, str], ks: Sequence[int] = (1, 5, 10),
                     *, lost: Tensor | None = None) -> dict[str, object]:
    """Recall@K of paired rows ``q[i] <-> t[i]`` in both directions, their mean, ``n`` and chance R@1 (the mean
    group size over n). ``lost``: rows that count as misses whatever their score (an input that no longer decodes)."""
    forward, backward = first_positive_rank(q, t, groups, groups), first_positive_rank(t, q, groups, groups)
    if lost is not None:
        forward[lost], backward[lost] = q.shape[0], q.shape[0]
    fw, bw = recall_at_k(forward, ks), recall_at_k(backward, ks)
    a, b = names
    return {f"{a}->{b}": fw, f"{b}->{a}": bw, "mean": {k: (fw[k] + bw[k]) / 2 for k in fw}, "n": int(q.shape[0]),
            "chance_R@1": round(float(torch.bincount(groups).double().mean() / q.shape[0]), 5)}


def topk_chunked(query: Tensor, gallery: Tensor, k: int, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Cosine top-``k`` gallery items of every query: ``(scores [Nq, k], indices [Nq, k])``, best first.

    Queries and gallery are both walked in chunks of ``chunk`` rows; per query chunk a running top-k is merged with
    each gallery chunk's similarities, so at most ``chunk x (chunk + k)`` scores exist at once. The order among
    exactly equal scores is unspecified (``torch.topk``).
    """
    if chunk < 1:
        raise ToolError(f"chunk must be a positive number of rows, got {chunk}")
    if not 1 <= k <= gallery.shape[0]:
        raise ToolError(f"k={k} must be between 1 and the gallery size {gallery.shape[0]}")
    q = F.normalize(query.float(), dim=-1)
    g = F.normalize(gallery.float(), dim=-1)
    scores = torch.empty(q.shape[0], k, device=q.device)
    indices = torch.empty(q.shape[0], k, dtype=torch.long, device=q.device)
    for qs in range(0, q.shape[0], chunk):
        qc = q[qs : qs + chunk]
        best_s = torch.empty(qc.shape[0], 0, device=q.device)
        best_i = torch.empty(qc.shape[0], 0, dtype=torch.long, device=q.device)
        for gs in range(0, g.shape[0], chunk):
            kept = best_s.shape[1]
            merged = torch.cat([best_s, qc @ g[gs : gs + chunk].T], dim=1)
            best_s, pos = merged.topk(min(k, merged.shape[1]), dim=1)
            from_chunk = gs + pos - kept
            best_i = from_chunk if kept == 0 else torch.where(
                pos < kept, best_i.gather(1, pos.clamp(max=kept - 1)), from_chunk)
        scores[qs : qs + chunk], indices[qs : qs + chunk] = best_s, best_i
    return scores, indices


@torch.no_grad()
def rerank_recall(query: Tensor, gallery: Tensor, query_groups: Tensor, gallery_groups: Tensor,
                  score_pairs: PairScorer, k: int, ks: Sequence[int] = (1, 5, 10), *, chunk: int = 4096,
                  pair_chunk: int = 1024) -> tuple[dict[str, float], Tensor]:
    """Recall@K after re-scoring each query's cosine top-``k`` with ``score_pairs`` (ITM re-ranking).

    ``score_pairs(query_idx [n], gallery_idx [n]) -> scores [n]`` (higher = better match) is called on at most
    ``pair_chunk`` pairs at a time. Returns ``({"R@K": ...}, ranks)`` where ``ranks[i]`` is the position of the
    first positive in query ``i``'s re-ordered candidate list, or ``k`` when no positive is among its cosine top-k
    (a miss for every ``K ≤ k``). Every ``K`` in ``ks`` must be ``≤ k``.
    """
    too_large = [kk for kk in ks if kk > k]
    if too_large:
        raise ToolError(f"Recall@{too_large} needs K <= k: only the top k={k} candidates are re-ranked")
    if pair_chunk < 1:
        raise ToolError(f"pair_chunk must be a positive number of pairs, got {pair_chunk}")
    _, candidates = topk_chunked(query, gallery, k, chunk)
    candidates = candidates.cpu()
    n_query = candidates.shape[0]
    query_idx = torch.arange(n_query).repeat_interleave(k)
    gallery_idx = candidates.reshape(-1)
    scores = torch.empty(n_query * k)
    for start in range(0, scores.numel(), pair_chunk):
        qi, gi = query_idx[start : start + pair_chunk], gallery_idx[start : start + pair_chunk]
        out = score_pairs(qi, gi)
        if out.shape != qi.shape:
            raise ToolError(f"score_pairs returned shape {tuple(out.shape)} for {qi.numel()} pairs; expected "
                             f"({qi.numel()},)")
        scores[start : start + pair_chunk] = out.detach().float().cpu()
    order = scores.view(n_query, k).sort(dim=1, descending=True, stable=True).indices
    reranked = candidates.gather(1, order)
    positive = gallery_groups.cpu()[reranked] == query_groups.cpu()[:, None]
    ranks = torch.where(positive.any(1), positive.int().argmax(1), torch.tensor(k))
    return recall_at_k(ranks, ks), ranks

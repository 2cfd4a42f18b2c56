"""Chunked cosine top-k against a full sort; ITM re-ranking (ALBEF / BLIP) against a brute-force re-ranking loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmssl.tools.errors import ToolError
from mmssl.tools.evaluation.retrieval import first_positive_rank, group_ids, recall_at_k, rerank_recall, topk_chunked


def _data(nq: int, ng: int, d: int, seed: int, strength: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(nq, d, generator=gen)
    g = torch.randn(ng, d, generator=gen)
    g[: min(nq, ng)] += strength * q[: min(nq, ng)]  # query i resembles gallery i
    return q, g


def _cosine(q: torch.Tensor, g: torch.Tensor) -> np.ndarray:
    qn = q.double().numpy() / np.linalg.norm(q.double().numpy(), axis=1, keepdims=True)
    gn = g.double().numpy() / np.linalg.norm(g.double().numpy(), axis=1, keepdims=True)
    return qn @ gn.T


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_topk_chunked_matches_a_full_sort(chunk: int) -> None:
    q, g = _data(37, 53, 8, seed=0)
    scores, idx = topk_chunked(q, g, 9, chunk=chunk)
    sims = _cosine(q, g)
    expected_idx = np.argsort(-sims, axis=1, kind="stable")[:, :9]
    assert idx.tolist() == expected_idx.tolist()
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(sims, expected_idx, 1), rtol=0, atol=1e-6)


def test_topk_chunked_k_equal_to_gallery_is_a_full_ranking() -> None:
    q, g = _data(5, 12, 4, seed=1)
    _, idx = topk_chunked(q, g, 12, chunk=5)
    assert idx.tolist() == np.argsort(-_cosine(q, g), axis=1, kind="stable").tolist()
    with pytest.raises(ToolError, match="k=13 must be between 1 and the gallery size 12"):
        topk_chunked(q, g, 13)


def _brute_rerank_ranks(q: torch.Tensor, g: torch.Tensor, qg: list[int], gg: list[int], score, k: int) -> list[int]:
    """Independent reference: sort the full cosine row, keep k, re-sort those by ``score`` (stable), find the first
    positive; k when none."""
    sims = _cosine(q, g)
    ranks = []
    for i in range(len(q)):
        top = list(np.argsort(-sims[i], kind="stable")[:k])
        new = [j for _, _, j in sorted((-float(score(i, j)), pos, j) for pos, j in enumerate(top))]
        ranks.append(next((r for r, j in enumerate(new) if gg[j] == qg[i]), k))
    return ranks


def test_rerank_matches_brute_force_reranking_with_grouped_positives() -> None:
    q, g = _data(40, 60, 6, seed=2)
    groups = group_ids([i // 3 for i in range(60)])  # gallery items 3t..3t+2 share group t
    q_groups = groups[:40]
    weights = torch.randn(60, generator=torch.Generator().manual_seed(3))

    def synthetic(i: int, j: int) -> float:  # an arbitrary non-monotone pair score
        return float(np.sin(1.7 * i + 0.3 * j) + weights[j])

    calls: list[tuple[list[int], list[int]]] = []

    def score_pairs(qi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        calls.append((qi.tolist(), gi.tolist()))
        return torch.tensor([synthetic(a, b) for a, b in zip(qi.tolist(), gi.tolist(), strict=True)])

    k = 8
    recall, ranks = rerank_recall(q, g, q_groups, groups, score_pairs, k, ks=(1, 5, 8), chunk=16, pair_chunk=13)
    expected = _brute_rerank_ranks(q, g, q_groups.tolist(), groups.tolist(), synthetic, k)
    assert ranks.tolist() == expected
    for kk in (1, 5, 8):
        assert recall[f"R@{kk}"] == pytest.approx(float(np.mean(np.array(expected) < kk)), abs=1e-12)
    # every (query, cosine candidate) pair is scored exactly once, in chunks of at most pair_chunk
    assert all(len(a) <= 13 for a, _ in calls)
    pairs = sorted((a, b) for qi, gi in calls for a, b in zip(qi, gi, strict=True))
    top = topk_chunked(q, g, k)[1]
    assert pairs == sorted((i, j) for i in range(40) for j in top[i].tolist())


def test_rerank_with_cosine_scores_equals_plain_recall() -> None:
    q, g = _data(64, 64, 16, seed=4, strength=0.5)
    qn, gn = F.normalize(q, dim=-1), F.normalize(g, dim=-1)
    ids = torch.arange(64)
    k = 10
    recall, ranks = rerank_recall(q, g, ids, ids, lambda qi, gi: (qn[qi] * gn[gi]).sum(-1), k, ks=(1, 5, 10),
                                  chunk=16, pair_chunk=50)
    plain = first_positive_rank(q, g, ids, ids, chunk=16)
    assert 0.0 < recall["R@1"] < 1.0 and recall["R@10"] < 1.0  # a non-trivial case: some positives fall outside k
    assert recall == recall_at_k(plain, (1, 5, 10))
    assert ranks.tolist() == plain.clamp(max=k).tolist()  # beyond the top-k a positive is a miss (rank k)


def test_an_oracle_matcher_lifts_every_recoverable_positive_to_rank_one() -> None:
    q, g = _data(50, 50, 8, seed=5)
    ids = torch.arange(50)
    k = 5
    recall, ranks = rerank_recall(q, g, ids, ids, lambda qi, gi: (qi == gi).float(), k, ks=(1, 5))
    plain = recall_at_k(first_positive_rank(q, g, ids, ids), (1, 5))
    assert recall["R@1"] == plain["R@5"] == recall["R@5"]
    assert plain["R@1"] < recall["R@1"] < 1.0  # re-ranking helps, but cannot recover positives outside the top 5
    assert set(ranks.tolist()) <= {0, k}


def test_rerank_rejects_recall_beyond_k_and_bad_scores() -> None:
    q, g = _data(6, 6, 4, seed=6)
    ids = torch.arange(6)
    with pytest.raises(ToolError, match=r"Recall@\[10\] needs K <= k: only the top k=5"):
        rerank_recall(q, g, ids, ids, lambda qi, gi: qi.float(), 5, ks=(1, 10))
    with pytest.raises(ToolError, match=r"score_pairs returned shape \(4, 1\) for 4 pairs"):
        rerank_recall(q, g, ids, ids, lambda qi, gi: qi.float()[:, None], 2, ks=(1,), pair_chunk=4)

"""Linear-probe logistic regression against scikit-learn; chunked Recall@K against the brute-force definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from mmssl.tools.evaluation.probe import fit_logistic_regression, linear_probe, predict, stratified_split
from mmssl.tools.evaluation.retrieval import first_positive_rank, group_ids, recall_at_k


def _blobs(n: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, d, generator=g), y


@pytest.mark.parametrize("l2", [1e-3, 1e-1, 1.0])
def test_logistic_regression_matches_sklearn(l2: float) -> None:
    x, y = _blobs(300, 12, 4, seed=0)
    w, b = fit_logistic_regression(x, y, 4, l2)
    ref = LogisticRegression(C=1.0 / (l2 * len(y)), max_iter=5000, tol=1e-10).fit(x.double().numpy(), y.numpy())
    # sklearn's multinomial model is identified only up to a shift shared by all classes: compare centred
    w_ref = torch.from_numpy(ref.coef_).double()
    b_ref = torch.from_numpy(ref.intercept_).double()
    torch.testing.assert_close(w - w.mean(0), w_ref - w_ref.mean(0), rtol=1e-3, atol=2e-4)
    torch.testing.assert_close(b - b.mean(), b_ref - b_ref.mean(), rtol=1e-3, atol=2e-4)
    assert torch.equal(predict(x, w, b), torch.from_numpy(ref.predict(x.numpy())))


def test_probe_selects_on_validation_and_scores_test_once() -> None:
    x, y = _blobs(400, 16, 5, seed=1)
    labels = [f"c{i}" for i in y.tolist()]
    result = linear_probe(x[:300], labels[:300], x[300:], labels[300:], seed=0)
    assert set(result.val_top1) == {f"{v:g}" for v in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1, 10)}
    assert result.val_top1[f"{result.best_l2:g}"] == max(result.val_top1.values())
    assert result.n_train + result.n_val == 300 and result.n_test == 100
    assert result.top1 > 0.8  # well-separated blobs


def test_stratified_split_keeps_every_class_in_training() -> None:
    y = torch.tensor([0] * 10 + [1] * 5 + [2])
    tr, va = stratified_split(y, 0.2, seed=0)
    assert set(y[tr].tolist()) == {0, 1, 2}
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(16))
    assert (y[va] == 0).sum() == 2 and (y[va] == 1).sum() == 1


def _brute_force_ranks(q: np.ndarray, g: np.ndarray, qg: np.ndarray, gg: np.ndarray) -> np.ndarray:
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    ranks = []
    for i in range(len(q)):
        order = np.argsort(-(q[i] @ g.T), kind="stable")
        ranks.append(next(r for r, j in enumerate(order) if gg[j] == qg[i]))
    return np.array(ranks)


def test_chunked_recall_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    q, g = torch.randn(70, 8, generator=gen), torch.randn(70, 8, generator=gen)
    groups = group_ids([i // 2 if i < 20 else i for i in range(70)])  # some items share a group
    ranks = first_positive_rank(q, g, groups, groups, chunk=16)
    expected = _brute_force_ranks(q.numpy(), g.numpy(), groups.numpy(), groups.numpy())
    assert ranks.tolist() == expected.tolist()
    recall = recall_at_k(ranks, (1, 5))
    assert recall["R@1"] == pytest.approx(float((expected < 1).mean()))
    assert recall["R@5"] == pytest.approx(float((expected < 5).mean()))


def test_perfect_embeddings_retrieve_perfectly() -> None:
    x = torch.randn(50, 16)
    ranks = first_positive_rank(x, x.clone(), torch.arange(50), torch.arange(50), chunk=7)
    assert recall_at_k(ranks)["R@1"] == 1.0


def test_ties_count_against_the_query() -> None:
    """A collapsed gallery (every item equal) retrieves nothing: ties rank non-positives first."""
    q = torch.randn(6, 4)
    ranks = first_positive_rank(q, torch.ones(6, 4), torch.arange(6), torch.arange(6))
    assert ranks.tolist() == [5] * 6 and recall_at_k(ranks, (1,))["R@1"] == 0.0

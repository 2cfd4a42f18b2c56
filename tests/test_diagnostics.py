"""Embedding geometry diagnostics against independent numpy loops and their defining properties."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmssl.tools.errors import ToolError
from mmssl.tools.evaluation.diagnostics import (
    alignment,
    effective_rank,
    embedding_diagnostics,
    modality_gap,
    uniformity,
)


def _normalise_rows(a: np.ndarray) -> np.ndarray:
    return np.stack([row / math.sqrt(sum(v * v for v in row)) for row in a])


def _randn(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("alpha", [2.0, 1.5])
def test_alignment_matches_numpy_loop(alpha: float) -> None:
    x, y = _randn(25, 6, 0), _randn(25, 6, 1)
    xn, yn = _normalise_rows(x.double().numpy()), _normalise_rows(y.double().numpy())
    expected = sum(np.linalg.norm(xn[i] - yn[i]) ** alpha for i in range(25)) / 25
    assert alignment(x, y, alpha=alpha) == pytest.approx(expected, rel=1e-12)


def test_alignment_extremes() -> None:
    x = _randn(10, 4, 2)
    assert alignment(x, 3.0 * x) == pytest.approx(0.0, abs=1e-14)  # identical directions
    assert alignment(x, -x, alpha=2.0) == pytest.approx(4.0, rel=1e-12)  # antipodal: ||2x̂||² = 4


def test_uniformity_matches_numpy_double_loop_and_chunking_is_exact() -> None:
    x = _randn(31, 5, 3)
    xn = _normalise_rows(x.double().numpy())
    t = 2.0
    terms = [math.exp(-t * float(np.sum((xn[i] - xn[j]) ** 2))) for i in range(31) for j in range(31) if i != j]
    expected = math.log(sum(terms) / len(terms))
    unchunked = uniformity(x, t=t, chunk=31)
    assert unchunked == pytest.approx(expected, rel=1e-12)
    for chunk in (1, 4, 7, 30):  # tiles that do not divide N, and single-row tiles
        assert uniformity(x, t=t, chunk=chunk) == pytest.approx(unchunked, rel=1e-12, abs=1e-13)


def test_uniformity_extremes() -> None:
    same = torch.ones(6, 3)
    assert uniformity(same, t=2.0) == pytest.approx(0.0, abs=1e-12)  # collapsed: every distance 0
    antipodal = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert uniformity(antipodal, t=2.0) == pytest.approx(-8.0, abs=1e-12)  # ||a - b||² = 4
    spread, clumped = _randn(200, 8, 4), _randn(200, 8, 5) * 0.05 + torch.ones(8)
    assert uniformity(spread) < uniformity(clumped)


def test_modality_gap_matches_numpy_and_vanishes_for_identical_sets() -> None:
    x, y = _randn(20, 6, 6) + 1.0, _randn(35, 6, 7) - 0.5
    cx = _normalise_rows(x.double().numpy()).mean(0)
    cy = _normalise_rows(y.double().numpy()).mean(0)
    gap = modality_gap(x, y)
    assert gap.distance == pytest.approx(float(np.linalg.norm(cx - cy)), rel=1e-12)
    assert gap.centroid_cosine == pytest.approx(float(cx @ cy / np.linalg.norm(cx) / np.linalg.norm(cy)), rel=1e-12)
    same = modality_gap(x, 2.0 * x)
    assert same.distance == pytest.approx(0.0, abs=1e-14) and same.centroid_cosine == pytest.approx(1.0, abs=1e-12)
    flipped = modality_gap(x, -x)
    assert flipped.distance == pytest.approx(2 * float(np.linalg.norm(cx)), rel=1e-12)
    assert flipped.centroid_cosine == pytest.approx(-1.0, abs=1e-12)
    assert gap.to_dict() == {"distance": gap.distance, "centroid_cosine": gap.centroid_cosine}


def test_effective_rank_matches_numpy_entropy_of_singular_values() -> None:
    x = _randn(40, 9, 8) * torch.linspace(0.1, 3.0, 9)
    a = x.double().numpy()
    sigma = np.linalg.svd(a - a.mean(0), compute_uv=False)
    p = sigma / sigma.sum()
    assert effective_rank(x) == pytest.approx(math.exp(-sum(v * math.log(v) for v in p if v > 0)), rel=1e-10)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_effective_rank_of_equal_singular_values_is_k(k: int) -> None:
    rng = np.random.default_rng(k)
    n, d = 30, 8
    # orthonormal columns orthogonal to the all-ones vector, so centring leaves the matrix unchanged
    basis = np.linalg.qr(np.concatenate([np.ones((n, 1)), rng.standard_normal((n, k))], axis=1))[0][:, 1:]
    right = np.linalg.qr(rng.standard_normal((d, k)))[0]
    x = torch.from_numpy(2.5 * basis @ right.T)
    assert effective_rank(x) == pytest.approx(float(k), abs=1e-9)
    assert effective_rank(x + torch.arange(d, dtype=torch.float64)) == pytest.approx(float(k), abs=1e-9)  # centred
    assert effective_rank(torch.ones(5, 3) * 7.0) == 0.0  # fully collapsed


def test_embedding_diagnostics_is_json_ready_and_consistent() -> None:
    image, text, audio = _randn(16, 8, 9), _randn(16, 8, 10), _randn(12, 8, 11)
    report = embedding_diagnostics({"image": image, "text": text, "audio": audio}, [("image", "text")], chunk=5)
    assert json.loads(json.dumps(report)) == report
    assert report["modalities"]["audio"] == {"n": 12, "dim": 8, "uniformity": pytest.approx(uniformity(audio)),
                                             "effective_rank": pytest.approx(effective_rank(audio))}
    pair = report["pairs"]["image/text"]
    assert pair["alignment"] == pytest.approx(alignment(image, text))
    assert pair["gap"] == pytest.approx(modality_gap(image, text).distance)
    with pytest.raises(ToolError, match="'video'"):
        embedding_diagnostics({"image": image}, [("image", "video")])
    with pytest.raises(ToolError, match="not row-paired"):
        embedding_diagnostics({"image": image, "audio": audio}, [("image", "audio")])
    with pytest.raises(ToolError, match="all-zero row"):
        alignment(torch.zeros(2, 3), image[:2, :3])

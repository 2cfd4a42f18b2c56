"""Exact BROJA PID: closed-form gates, PID identities, feasibility/optimality of q*, a brute-force reference, and the
prediction-based dataset estimator. Information is in bits; tolerances are stated per test."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from mmssl.tools.errors import ToolError
from mmssl.tools.evaluation.interactions import PID, joint_distribution, optimal_coupling, pid, pid_from_predictions

EXACT_TOL = 1e-7  # bits, for the closed-form cases (the barrier stops at a duality gap of about #vars·1e-10 nats)


def _entropy_bits(probs: np.ndarray) -> float:
    flat = probs[probs > 0]
    return float(-(flat * np.log2(flat)).sum())


def _mi_bits(joint: np.ndarray, a_axes: tuple[int, ...], b_axes: tuple[int, ...]) -> float:
    """``I(A;B) = H(A) + H(B) - H(A,B)`` from a joint table, marginalising every axis outside A and B."""
    axes = set(range(joint.ndim))
    h_a = _entropy_bits(joint.sum(axis=tuple(axes - set(a_axes))))
    h_b = _entropy_bits(joint.sum(axis=tuple(axes - set(b_axes))))
    h_ab = _entropy_bits(joint.sum(axis=tuple(axes - set(a_axes) - set(b_axes))))
    return h_a + h_b - h_ab


def _gate(fn: Callable[[int, int], int]) -> np.ndarray:
    p = np.zeros((2, 2, 2))
    for a in range(2):
        for b in range(2):
            p[a, b, fn(a, b)] += 0.25
    return p


def _random_joint(shape: tuple[int, int, int], seed: int, zero_fraction: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(math.prod(shape), 0.8)).reshape(shape)
    if zero_fraction:
        p[rng.random(shape) < zero_fraction] = 0.0
        p[0, 0, 0] += 1e-3  # never all-zero
    return p / p.sum()


def _assert_pid(result: PID, r: float, u1: float, u2: float, s: float, tol: float) -> None:
    got = (result.redundancy, result.unique1, result.unique2, result.synergy)
    assert np.allclose(got, (r, u1, u2, s), atol=tol), got


def test_copy_is_pure_redundancy() -> None:
    p = np.zeros((2, 2, 2))
    p[0, 0, 0] = p[1, 1, 1] = 0.5  # X1 = X2 = Y, a uniform bit
    _assert_pid(pid(p), 1.0, 0.0, 0.0, 0.0, EXACT_TOL)


def test_one_modality_copy_is_pure_uniqueness() -> None:
    _assert_pid(pid(_gate(lambda a, b: a)), 0.0, 1.0, 0.0, 0.0, EXACT_TOL)  # Y = X1, X2 independent uniform
    _assert_pid(pid(_gate(lambda a, b: b)), 0.0, 0.0, 1.0, 0.0, EXACT_TOL)


def test_xor_is_pure_synergy() -> None:
    _assert_pid(pid(_gate(lambda a, b: a ^ b)), 0.0, 0.0, 0.0, 1.0, EXACT_TOL)


def test_and_gate_closed_form() -> None:
    # BROJA of AND: R = I(X1;Y) = H(Y) - H(Y|X1) = h(1/4) - 1/2 ≈ 0.3113, U1 = U2 = 0, S = 1/2
    h_quarter = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    result = pid(_gate(lambda a, b: a & b))
    _assert_pid(result, h_quarter - 0.5, 0.0, 0.0, 0.5, EXACT_TOL)
    assert result.total == pytest.approx(h_quarter, abs=1e-12)


@pytest.mark.parametrize("shape", [(3, 3, 2), (4, 3, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pid_identities_on_random_joints(shape: tuple[int, int, int], seed: int) -> None:
    p = _random_joint(shape, seed, zero_fraction=0.3 if seed % 2 else 0.0)
    result = pid(p)
    i1, i2, i12 = _mi_bits(p, (0,), (2,)), _mi_bits(p, (1,), (2,)), _mi_bits(p, (0, 1), (2,))
    assert result.redundancy + result.unique1 == pytest.approx(i1, abs=1e-9)
    assert result.redundancy + result.unique2 == pytest.approx(i2, abs=1e-9)
    parts = result.redundancy + result.unique1 + result.unique2 + result.synergy
    assert parts == pytest.approx(i12, abs=1e-9) and result.total == pytest.approx(i12, abs=1e-9)
    assert min(result.to_dict().values()) >= -1e-6
    # R - S is the co-information I(X1;X2;Y) = I(X1;Y) - I(X1;Y|X2), whatever the coupling
    assert result.redundancy - result.synergy == pytest.approx(i1 + i2 - i12, abs=1e-9)


def test_swapping_modalities_swaps_uniqueness_and_relabelling_changes_nothing() -> None:
    p = _random_joint((4, 3, 3), seed=7)
    base = pid(p)
    swapped = pid(p.transpose(1, 0, 2))
    assert (swapped.unique1, swapped.unique2) == pytest.approx((base.unique2, base.unique1), abs=1e-7)
    assert (swapped.redundancy, swapped.synergy) == pytest.approx((base.redundancy, base.synergy), abs=1e-7)
    rng = np.random.default_rng(0)
    relabelled = p[rng.permutation(4)][:, rng.permutation(3)][:, :, rng.permutation(3)]
    assert pid(relabelled).to_dict() == pytest.approx(base.to_dict(), abs=1e-7)


def _min_info_bits(q: np.ndarray) -> float:
    return _mi_bits(q, (0, 1), (2,))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_optimal_coupling_is_feasible_on_the_support(seed: int) -> None:
    p = _random_joint((4, 3, 3), seed, zero_fraction=0.35)
    q = optimal_coupling(p)
    assert np.abs(q.sum(1) - p.sum(1)).max() < 1e-8
    assert np.abs(q.sum(0) - p.sum(0)).max() < 1e-8
    assert q.min() >= 0.0
    support = (p.sum(1)[:, None, :] > 0) & (p.sum(0)[None, :, :] > 0)
    assert np.all(q[~support] == 0.0)


def _transport_vertex(rows: np.ndarray, cols: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """North-west-corner rule under random row/column orders: a vertex of the transportation polytope."""
    r_order, c_order = rng.permutation(len(rows)), rng.permutation(len(cols))
    r_left, c_left = rows.astype(float).copy(), cols.astype(float).copy()
    out = np.zeros((len(rows), len(cols)))
    i = j = 0
    while i < len(rows) and j < len(cols):
        a, b = r_order[i], c_order[j]
        mass = min(r_left[a], c_left[b])
        out[a, b] += mass
        r_left[a] -= mass
        c_left[b] -= mass
        if r_left[a] <= c_left[b]:
            i += 1
        else:
            j += 1
    return out


@pytest.mark.parametrize("shape,seed", [((3, 3, 2), 0), ((4, 3, 3), 1), ((3, 4, 2), 2)])
def test_optimum_beats_200_random_feasible_points(shape: tuple[int, int, int], seed: int) -> None:
    p = _random_joint(shape, seed)
    p1, p2, py = p.sum(1), p.sum(0), p.sum((0, 1))
    product = p1[:, None, :] * p2[None, :, :] / py
    best = _min_info_bits(optimal_coupling(p))
    rng = np.random.default_rng(seed)
    for _ in range(200):
        vertex = np.stack([_transport_vertex(p1[:, y], p2[:, y], rng) for y in range(shape[2])], axis=-1)
        w = rng.dirichlet(np.ones(3) * 0.5)
        q = w[0] * p + w[1] * product + w[2] * vertex  # a convex mix of points of Δ_p stays in Δ_p
        assert np.abs(q.sum(1) - p1).max() < 1e-12 and np.abs(q.sum(0) - p2).max() < 1e-12
        assert _min_info_bits(q) >= best - 1e-9


def _brute_force_min_info_222(p: np.ndarray, grid: int = 801) -> float:
    """For 2×2×2, Δ_p is a rectangle: q(·,·,y) is fixed by its corner a_y. Grid search plus golden refinement."""
    p1, p2 = p.sum(1), p.sum(0)
    lo = [max(0.0, p2[0, y] - p1[1, y]) for y in range(2)]
    hi = [min(p1[0, y], p2[0, y]) for y in range(2)]

    def info(a0: np.ndarray, a1: np.ndarray) -> np.ndarray:
        q = np.zeros((*a0.shape, 2, 2, 2))
        for y, a in ((0, a0), (1, a1)):
            q[..., 0, 0, y], q[..., 0, 1, y] = a, p1[0, y] - a
            q[..., 1, 0, y], q[..., 1, 1, y] = p2[0, y] - a, p1[1, y] - p2[0, y] + a
        q = np.clip(q, 0.0, None)
        q12 = q.sum(-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            neg_cond_entropy = np.where(q > 0, q * np.log2(q / q12), 0.0).sum((-1, -2, -3))
        return _entropy_bits(p.sum((0, 1))) + neg_cond_entropy

    g0, g1 = np.meshgrid(np.linspace(lo[0], hi[0], grid), np.linspace(lo[1], hi[1], grid), indexing="ij")
    values = info(g0, g1)
    k = np.unravel_index(values.argmin(), values.shape)
    best, centre = float(values[k]), [g0[k], g1[k]]
    width = [(hi[0] - lo[0]) / (grid - 1), (hi[1] - lo[1]) / (grid - 1)]
    for _ in range(30):  # zoom: a finer grid around the incumbent, clipped to the rectangle
        a0 = np.clip(np.linspace(centre[0] - width[0], centre[0] + width[0], 41), lo[0], hi[0])
        a1 = np.clip(np.linspace(centre[1] - width[1], centre[1] + width[1], 41), lo[1], hi[1])
        m0, m1 = np.meshgrid(a0, a1, indexing="ij")
        values = info(m0, m1)
        k = np.unravel_index(values.argmin(), values.shape)
        best, centre = min(best, float(values[k])), [m0[k], m1[k]]
        width = [w / 10 for w in width]
    return best


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_on_binary_variables(seed: int) -> None:
    p = np.random.default_rng(100 + seed).dirichlet(np.full(8, 0.7)).reshape(2, 2, 2)
    reference_min = _brute_force_min_info_222(p)
    result = pid(p)
    i1, i2 = _mi_bits(p, (0,), (2,)), _mi_bits(p, (1,), (2,))
    assert result.redundancy == pytest.approx(i1 + i2 - reference_min, abs=1e-8)
    assert result.synergy == pytest.approx(_mi_bits(p, (0, 1), (2,)) - reference_min, abs=1e-8)


def test_joint_distribution_counts_match_a_python_loop() -> None:
    rng = np.random.default_rng(0)
    x1 = rng.choice(["cat", "dog", "eel"], size=500)
    x2 = rng.integers(0, 4, size=500)
    y = rng.integers(3, 5, size=500)
    p, (a, b, c) = joint_distribution(x1, x2, y)
    assert list(a) == ["cat", "dog", "eel"] and list(b) == [0, 1, 2, 3] and list(c) == [3, 4]
    counts = Counter(zip(x1.tolist(), x2.tolist(), y.tolist(), strict=True))
    for (u, v, w), n in counts.items():
        assert p[list(a).index(u), list(b).index(v), list(c).index(w)] == pytest.approx(n / 500, abs=1e-15)
    assert p.sum() == pytest.approx(1.0, abs=1e-12) and np.count_nonzero(p) == len(counts)


def test_pid_from_predictions_recovers_the_generating_pid() -> None:
    generating = _random_joint((3, 3, 2), seed=11)
    exact = pid(generating)
    n = 200_000
    rng = np.random.default_rng(5)
    flat = rng.choice(generating.size, size=n, p=generating.reshape(-1))
    pred1, pred2, y = np.unravel_index(flat, generating.shape)
    estimate = pid_from_predictions(pred1, pred2, y)
    assert estimate.n_samples == n and estimate.support == (3, 3, 2)
    # plug-in MI bias is about (cells)/(2N ln 2) ≈ 1e-4 bits and the sampling s.d. a few 1e-3 bits at this N
    assert estimate.pid.to_dict() == pytest.approx(exact.to_dict(), abs=0.01)
    # class scores [N, C] are discretised by argmax: the same estimate
    scores1 = np.eye(3)[pred1] + rng.random((n, 3)) * 0.1
    from_scores = pid_from_predictions(scores1, pred2, y)
    assert from_scores.pid.to_dict() == pytest.approx(estimate.pid.to_dict(), abs=1e-9)
    assert set(estimate.to_dict()) == {"redundancy", "unique1", "unique2", "synergy", "total", "n_samples", "support"}


def test_invalid_inputs_name_the_offending_value() -> None:
    p = _gate(lambda a, b: a & b)
    bad = p.copy()
    bad[0, 1, 0] = -0.25
    bad[0, 0, 0] += 0.5
    with pytest.raises(ToolError, match=r"non-negative.*p\[0, 1, 0\] = -0.25"):
        pid(bad)
    with pytest.raises(ToolError, match=r"sum to 1.*2\.0"):
        pid(2 * p)
    with pytest.raises(ToolError, match=r"\[\|X1\|, \|X2\|, \|Y\|\]"):
        pid(np.ones((2, 2)) / 4)
    with pytest.raises(ToolError, match=r"equal lengths.*'x2': 2"):
        joint_distribution([0, 1, 1], [0, 1], [1, 1, 0])
    with pytest.raises(ToolError, match=r"pred1.*equal lengths"):
        pid_from_predictions([0, 1, 1], [0, 1], [1, 1, 0])

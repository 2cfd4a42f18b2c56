"""Exact Partial Information Decomposition (PID) of a discrete joint ``p(x1, x2, y)`` (the thesis' CVX estimator).

PID (Williams & Beer, 2010) splits ``I_p(X1,X2;Y)`` into redundancy R, uniqueness U1/U2 and synergy S. We use the
BROJA definition (Bertschinger, Rauh, Olbrich, Jost & Ay, 2014), as in Liang et al. (2023, "Quantifying & Modeling
Multimodal Interactions", thesis ch. 3):

    Δ_p = {q ≥ 0 : q(x1,y) = p(x1,y), q(x2,y) = p(x2,y)},        q* = argmin_{q ∈ Δ_p} I_q(X1,X2;Y)
    R  = I_q*(X1;Y) + I_q*(X2;Y) - I_q*(X1,X2;Y),   U1 = I_q*(X1;Y) - R,   U2 = I_q*(X2;Y) - R,
    S  = I_p(X1,X2;Y) - I_q*(X1,X2;Y)                              (all in bits; R+U1+U2+S = I_p(X1,X2;Y)).

Since q(y) = p(y) on Δ_p, minimising I_q(X1,X2;Y) is minimising the convex ``f(q) = Σ q log(q(x1,x2,y)/q(x1,x2))``
(= -H_q(Y|X1,X2)) under linear equalities. Every q ∈ Δ_p vanishes wherever p(x1,y)·p(x2,y) = 0, so q lives on that
support, where the product coupling ``q0 = p(x1,y)p(x2,y)/p(y)`` is a strictly positive feasible point. We solve it
with a primal log-barrier interior-point method (Boyd & Vandenberghe, 2004, §11.3): Newton steps on
``t·f(q) - Σ log q`` under the equalities, t ← 10t, until the duality-gap bound ``#vars / t`` is below ``tol``
(t ≤ ``T_MAX``).
f's Hessian is block diagonal over (x1, x2) with blocks ``diag(1/q) - 11ᵀ/q(x1,x2)``, so each KKT system reduces
by Sherman-Morrison to a small dense system in the marginal constraints. ``pid_from_predictions`` is the thesis'
dataset estimator: each modality is discretised by a unimodal classifier's predicted class.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from mmssl.tools.errors import ToolError

LOG2 = math.log(2.0)
T_MAX = 1e10  # beyond this the float64 rounding of t·∇f exceeds the barrier's own gap #vars/t


@dataclass
class PID:
    """BROJA partial information decomposition in bits; ``total = I_p(X1,X2;Y) = R + U1 + U2 + S``."""

    redundancy: float
    unique1: float
    unique2: float
    synergy: float
    total: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class PredictionPID:
    """PID of the empirical joint of two unimodal predictions and the label, with the sample count it rests on."""

    pid: PID
    n_samples: int
    support: tuple[int, int, int]

    def to_dict(self) -> dict[str, Any]:
        return {**self.pid.to_dict(), "n_samples": self.n_samples, "support": list(self.support)}


def _xlogx_ratio(num: np.ndarray, den: np.ndarray) -> float:
    """``Σ num·log(num/den)`` with the convention 0·log(0/·) = 0."""
    keep = num > 0
    return float(np.sum(num[keep] * np.log(num[keep] / den[keep])))


def mutual_information(joint: np.ndarray) -> float:
    """``I(A;B)`` in nats of a 2-D joint probability table ``joint[a, b]``."""
    return _xlogx_ratio(joint, np.outer(joint.sum(1), joint.sum(0)))


def _check_joint(p: Any) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 3 or 0 in arr.shape:
        raise ToolError(f"p must be a non-empty [|X1|, |X2|, |Y|] array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ToolError("p contains non-finite entries")
    if (arr < 0).any():
        idx = tuple(int(i) for i in np.argwhere(arr < 0)[0])
        raise ToolError(f"p must be non-negative, got p{list(idx)} = {float(arr[idx])!r}")
    total = float(arr.sum())
    if abs(total - 1.0) > 1e-9:
        raise ToolError(f"p must sum to 1, got sum(p) = {total!r}")
    return arr / total


def _solve_spd(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve the (theoretically positive-definite) Schur system; least squares when rounding made it singular."""
    try:
        return np.linalg.solve(matrix, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(matrix, rhs, rcond=None)[0]


class _BarrierProblem:
    """Log-barrier Newton solver of ``min f(q)`` over Δ_p restricted to the support ``mask``."""

    def __init__(self, p: np.ndarray) -> None:
        self.p1, self.p2 = p.sum(1), p.sum(0)  # [X1, Y], [X2, Y]
        self.mask = (self.p1[:, None, :] > 0) & (self.p2[None, :, :] > 0)
        self.rows1 = self.p1 > 0  # active constraints q(x1, y) = p(x1, y)
        self.rows2 = self.p2 > 0
        # per y the x1-rows and x2-rows both sum to p(y): drop the first active x2-row of each y (full row rank)
        for y in range(p.shape[2]):
            first = np.flatnonzero(self.rows2[:, y])
            if first.size:
                self.rows2[first[0], y] = False
        self.n_vars = int(self.mask.sum())

    def start(self) -> np.ndarray:
        py = self.p1.sum(0)
        safe_py = np.where(py > 0, py, 1.0)
        return np.where(self.mask, self.p1[:, None, :] * self.p2[None, :, :] / safe_py, 0.0)

    def objective(self, q: np.ndarray) -> float:
        q12 = q.sum(2, keepdims=True)
        return _xlogx_ratio(q, np.broadcast_to(q12, q.shape))

    def barrier_value(self, q: np.ndarray, t: float) -> float:
        return t * self.objective(q) - float(np.log(q[self.mask]).sum())

    def residual(self, q: np.ndarray) -> np.ndarray:
        return np.concatenate([(self.p1 - q.sum(1))[self.rows1], (self.p2 - q.sum(0))[self.rows2]])

    def _apply_a(self, v: np.ndarray) -> np.ndarray:
        return np.concatenate([v.sum(1)[self.rows1], v.sum(0)[self.rows2]])

    def _apply_at(self, w: np.ndarray) -> np.ndarray:
        lam = np.zeros_like(self.p1)
        mu = np.zeros_like(self.p2)
        k = int(self.rows1.sum())
        lam[self.rows1], mu[self.rows2] = w[:k], w[k:]
        return (lam[:, None, :] + mu[None, :, :]) * self.mask

    def _kkt_step(self, q: np.ndarray, t: float, grad: np.ndarray) -> np.ndarray:
        """Solve ``[H Aᵀ; A 0][dx; w] = [-grad; r]`` with H the Hessian of ``t·f - Σ log q`` (r = b - Aq).

        Per (x1, x2) block ``H = D - c·11ᵀ``, ``D = t/q + 1/q²``, ``c = t/q(x1,x2)``; Sherman-Morrison gives
        ``H⁻¹ = D⁻¹ + γ·D⁻¹11ᵀD⁻¹``, ``γ = t / Σ_y q/(t q + 1)``; then w solves ``(A H⁻¹ Aᵀ) w = -(r + A H⁻¹ grad)``.
        """
        qs = np.where(self.mask, q, 1.0)
        d_inv = np.where(self.mask, qs * qs / (t * qs + 1.0), 0.0)
        denom = np.where(self.mask, qs / (t * qs + 1.0), 0.0).sum(2, keepdims=True)
        gamma = np.divide(t, denom, out=np.zeros_like(denom), where=denom > 0)

        def h_inv(v: np.ndarray) -> np.ndarray:
            return d_inv * v + gamma * d_inv * (d_inv * v).sum(-1, keepdims=True)

        w = _solve_spd(self._schur(d_inv, gamma), -(self.residual(q) + self._apply_a(h_inv(grad))))
        return -h_inv(grad + self._apply_at(w))

    def _schur(self, d_inv: np.ndarray, gamma: np.ndarray) -> np.ndarray:
        """``A H⁻¹ Aᵀ`` over the kept rows, from the block inverses ``K[i,j] = diag(d) + γ d dᵀ`` (d = D⁻¹ on block)."""
        n1, n2, ny = d_inv.shape
        blocks = np.einsum("ijy,yz->ijyz", d_inv, np.eye(ny)) + gamma[..., None] * np.einsum("ijy,ijz->ijyz", d_inv,
                                                                                                d_inv)
        full = np.zeros((n1 + n2, ny, n1 + n2, ny))
        full[np.arange(n1), :, np.arange(n1), :] = blocks.sum(1)  # rows q(x1, y) against themselves
        full[n1 + np.arange(n2), :, n1 + np.arange(n2), :] = blocks.sum(0)  # rows q(x2, y)
        full[:n1, :, n1:, :] = blocks.transpose(0, 2, 1, 3)  # q(x1, y) against q(x2, y')
        full[n1:, :, :n1, :] = blocks.transpose(1, 3, 0, 2)
        keep = np.concatenate([self.rows1.reshape(-1), self.rows2.reshape(-1)])
        flat = full.reshape((n1 + n2) * ny, (n1 + n2) * ny)
        return flat[np.ix_(keep, keep)]

    def newton_step(self, q: np.ndarray, t: float) -> tuple[np.ndarray, float]:
        """Newton direction of ``t·f - Σ log q`` under the equalities (infeasible-start form) and its decrement²."""
        qs = np.where(self.mask, q, 1.0)
        q12 = np.where(self.mask, q, 0.0).sum(2, keepdims=True)
        q12 = np.where(q12 > 0, q12, 1.0)
        grad = np.where(self.mask, t * np.log(qs / q12) - 1.0 / qs, 0.0)
        step = self._kkt_step(q, t, grad)
        return step, float(-(grad * step).sum())

    def restore_equalities(self, q: np.ndarray, t: float) -> np.ndarray:
        """The equality-restoring part of the step alone (no objective term): removes accumulated rounding drift."""
        step = self._kkt_step(q, t, np.zeros_like(q))
        return np.where(self.mask, q + self.max_step(q, step) * step, 0.0)

    def max_step(self, q: np.ndarray, step: np.ndarray) -> float:
        """Largest ``s ≤ 1`` keeping ``q + s·step`` strictly positive (0.99 of the way to the boundary)."""
        neg = step[self.mask] < 0
        return min(1.0, 0.99 * float(np.min(-q[self.mask][neg] / step[self.mask][neg]))) if neg.any() else 1.0


def optimal_coupling(p: Any, tol: float = 1e-10, max_newton: int = 2000) -> np.ndarray:
    """``q* = argmin_{q ∈ Δ_p} I_q(X1,X2;Y)`` (BROJA, Bertschinger et al. 2014), to an objective gap ≲ ``tol`` nats.

    ``p`` is validated (non-negative, sums to 1). The result lies in Δ_p up to rounding. The barrier weight t stops
    at ``#vars / tol`` (capped at ``T_MAX``, beyond which float64 rounding of ``t·∇f`` dominates).
    """
    arr = _check_joint(p)
    prob = _BarrierProblem(arr)
    q = prob.start()
    if prob.n_vars == 0 or not (prob.rows1.any() or prob.rows2.any()):
        return q
    # the Schur systems are small (≤ (|X1|+|X2|)·|Y|): threaded BLAS only thrashes on them on a loaded machine
    with threadpool_limits(limits=1, user_api="blas"):
        return _barrier_solve(prob, q, tol, max_newton)


def _barrier_solve(prob: _BarrierProblem, q: np.ndarray, tol: float, max_newton: int) -> np.ndarray:
    t, steps = 1.0, 0
    t_final = min(prob.n_vars / tol, T_MAX)
    while True:
        for _ in range(100):
            step, decrement = prob.newton_step(q, t)
            s = prob.max_step(q, step)
            if decrement / 2 <= 1e-10:  # centred: only restore the equalities if rounding has drifted them
                if np.abs(prob.residual(q)).max() > 1e-14:
                    q = np.where(prob.mask, q + s * step, 0.0)
                break
            base = prob.barrier_value(q, t)  # Armijo backtracking; failing it means the float64 noise floor
            while s > 1e-10 and prob.barrier_value(q + s * step, t) > base - 0.25 * s * decrement:
                s *= 0.5
            if s <= 1e-10:
                break
            q = np.where(prob.mask, q + s * step, 0.0)
            steps += 1
            if steps > max_newton:
                raise ToolError(f"PID optimisation did not converge within max_newton={max_newton} Newton steps")
        if t >= t_final:
            return prob.restore_equalities(q, t)
        t = min(10.0 * t, t_final)


def pid(p: Any, tol: float = 1e-10) -> PID:
    """BROJA PID (bits) of a joint probability table ``p[x1, x2, y]``; see the module docstring for the formulas."""
    arr = _check_joint(p)
    q = optimal_coupling(arr, tol=tol)
    i1 = mutual_information(q.sum(1))
    i2 = mutual_information(q.sum(0))
    i12_q = mutual_information(q.reshape(-1, q.shape[2]))
    i12_p = mutual_information(arr.reshape(-1, arr.shape[2]))
    redundancy = i1 + i2 - i12_q
    return PID(redundancy=redundancy / LOG2, unique1=(i1 - redundancy) / LOG2, unique2=(i2 - redundancy) / LOG2,
               synergy=(i12_p - i12_q) / LOG2, total=i12_p / LOG2)


def _as_labels(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # torch.Tensor without importing torch here
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ToolError(f"{name} must be a 1-D array of discrete labels, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ToolError(f"{name} must hold integer or string labels, got non-integer floats")
        arr = arr.astype(np.int64)
    return arr


def joint_distribution(x1: Any, x2: Any, y: Any) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Empirical joint ``p[i, j, k] = #{n : x1_n = a_i, x2_n = b_j, y_n = c_k} / N`` of three equal-length arrays.

    Returns ``(p, (a, b, c))`` with the sorted distinct values of each array as axis labels.
    """
    return _empirical_joint((x1, x2, y), ("x1", "x2", "y"))


def _empirical_joint(columns: tuple[Any, Any, Any], names: tuple[str, str, str]
                     ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    arrays = [_as_labels(v, n) for v, n in zip(columns, names, strict=True)]
    lengths = {name: len(a) for name, a in zip(names, arrays, strict=True)}
    if len(set(lengths.values())) != 1:
        raise ToolError(f"{', '.join(names)} must have equal lengths, got {lengths}")
    if arrays[0].size == 0:
        raise ToolError(f"{', '.join(names)} are empty; the empirical joint needs at least one sample")
    labels, codes = zip(*(np.unique(a, return_inverse=True) for a in arrays), strict=True)
    counts = np.zeros(tuple(len(lab) for lab in labels))
    np.add.at(counts, tuple(c.reshape(-1) for c in codes), 1.0)
    return counts / counts.sum(), (labels[0], labels[1], labels[2])


def _predicted_class(pred: Any) -> Any:
    if hasattr(pred, "detach"):
        pred = pred.detach().cpu().numpy()
    arr = np.asarray(pred)
    return arr.argmax(-1) if arr.ndim == 2 else arr


def pid_from_predictions(pred1: Any, pred2: Any, y: Any, tol: float = 1e-10) -> PredictionPID:
    """The thesis' dataset PID estimator: ``PID(p̂(ŷ1, ŷ2, y))`` of the empirical joint of the two unimodal
    classifiers' predicted classes and the label.

    ``pred1``/``pred2`` are predicted classes ``[N]`` or per-class scores ``[N, C]`` (argmax is taken).
    """
    p, labels = _empirical_joint((_predicted_class(pred1), _predicted_class(pred2), y), ("pred1", "pred2", "y"))
    support = (len(labels[0]), len(labels[1]), len(labels[2]))
    return PredictionPID(pid=pid(p, tol=tol), n_samples=len(_as_labels(y, "y")), support=support)

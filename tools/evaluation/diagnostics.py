"""Geometry diagnostics of learned embeddings: alignment, uniformity, modality gap, effective rank.

All functions take ``[N, D]`` embedding tensors (rows are samples), compute in float64 on the input's device and
return Python floats, so ``embedding_diagnostics`` is directly JSON-serialisable. Formulas (``f̂ = f / ||f||_2``):

- alignment (Wang & Isola, 2020):   ``ℓ_align = E_{(x,y)~pos} ||f̂(x) - f̂(y)||_2^α``
- uniformity (Wang & Isola, 2020):  ``ℓ_unif = log E_{i≠j} exp(-t ||f̂_i - f̂_j||_2^2)``
- modality gap (Liang et al., 2022, "Mind the Gap"): ``Δ_gap = ||mean_i f̂(x_i) - mean_j f̂(y_j)||_2``
- effective rank (Roy & Vetterli, 2007): ``erank(X) = exp(-Σ_k p_k log p_k)``, ``p_k = σ_k / Σ_l σ_l`` over the
  singular values of the column-centred ``X``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmssl.tools.errors import ToolError

DEFAULT_CHUNK = 2048


def _as_matrix(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ToolError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ToolError(f"{name} must be a non-empty [N, D] matrix, got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise ToolError(f"{name} contains non-finite values")
    return x


def _normalised(x: Tensor, name: str) -> Tensor:
    x = _as_matrix(x, name)
    if (x.norm(dim=1) == 0).any():
        raise ToolError(f"{name} has an all-zero row, which has no direction to L2-normalise")
    return F.normalize(x, dim=1)


def alignment(x: Tensor, y: Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola (2020) alignment ``E_i ||x̂_i - ŷ_i||_2^α`` over the positive pairs ``(x_i, y_i)`` (row i of each).

    0 for identical pairs; at most ``2^α`` (antipodal pairs).
    """
    if not alpha > 0:
        raise ToolError(f"alpha must be > 0, got {alpha!r}")
    xn, yn = _normalised(x, "x"), _normalised(y, "y")
    if xn.shape != yn.shape:
        raise ToolError(f"alignment needs paired rows: x has shape {tuple(xn.shape)}, y has {tuple(yn.shape)}")
    return float((xn - yn).norm(dim=1).pow(alpha).mean())


def uniformity(x: Tensor, t: float = 2.0, chunk: int = DEFAULT_CHUNK) -> float:
    """Wang & Isola (2020) uniformity ``log (1/(N(N-1))) Σ_{i≠j} exp(-t ||x̂_i - x̂_j||_2^2)``.

    Evaluated block by block (``chunk × chunk`` similarity tiles on and above the diagonal, ``||a-b||² = 2 - 2 a·b``
    for unit rows) with a log-sum-exp over tiles, so memory is O(chunk²) however large N is.
    Ranges over ``[-4t, 0]``; lower is more uniform.
    """
    if not t > 0:
        raise ToolError(f"t must be > 0, got {t!r}")
    if chunk < 1:
        raise ToolError(f"chunk must be >= 1, got {chunk!r}")
    xn = _normalised(x, "x")
    n = xn.shape[0]
    if n < 2:
        raise ToolError(f"uniformity needs at least 2 rows, got {n}")
    block_lse: list[Tensor] = []
    for i0 in range(0, n, chunk):
        rows = xn[i0:i0 + chunk]
        for j0 in range(i0, n, chunk):  # upper tiles only: an off-diagonal tile stands for itself and its mirror
            sq_dist = (2.0 - 2.0 * rows @ xn[j0:j0 + chunk].T).clamp_min(0.0)
            logits = -t * sq_dist
            if i0 == j0:
                logits.fill_diagonal_(-math.inf)
            else:
                logits += math.log(2.0)
            block_lse.append(torch.logsumexp(logits.reshape(-1), dim=0))
    return float(torch.logsumexp(torch.stack(block_lse), dim=0) - math.log(n * (n - 1)))


@dataclass
class ModalityGap:
    """Liang et al. (2022) modality gap between two embedding sets: centroid distance and centroid cosine."""

    distance: float
    centroid_cosine: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def modality_gap(x: Tensor, y: Tensor) -> ModalityGap:
    """``||mean_i x̂_i - mean_j ŷ_j||_2`` and ``cos(mean x̂, mean ŷ)`` (Liang et al., 2022, "Mind the Gap").

    x and y need not have the same number of rows, only the same dimension. The cosine is 0 when a centroid is 0.
    """
    xn, yn = _normalised(x, "x"), _normalised(y, "y")
    if xn.shape[1] != yn.shape[1]:
        raise ToolError(f"modality_gap needs one embedding space: x has dim {xn.shape[1]}, y has {yn.shape[1]}")
    cx, cy = xn.mean(0), yn.mean(0)
    denom = cx.norm() * cy.norm()
    cosine = float(cx @ cy / denom) if denom > 0 else 0.0
    return ModalityGap(distance=float((cx - cy).norm()), centroid_cosine=cosine)


def effective_rank(x: Tensor) -> float:
    """Roy & Vetterli (2007) effective rank ``exp(H(p))``, ``p_k = σ_k / Σσ`` of the column-centred matrix.

    Lies in ``[1, min(N, D)]`` (``k`` exactly when ``k`` singular values are equal and the rest 0); 0.0 is returned
    for a fully collapsed set (all rows equal), whose centred matrix has no non-zero singular value.
    """
    xm = _as_matrix(x, "x")
    centred = xm - xm.mean(0, keepdim=True)
    sigma = torch.linalg.svdvals(centred)
    if float(sigma.sum()) <= 1e-12 * float(xm.norm()):  # rows equal up to float64 rounding of the mean
        return 0.0
    p = sigma / sigma.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def embedding_diagnostics(embeddings: dict[str, Tensor], pairs: list[tuple[str, str]], *, alpha: float = 2.0,
                          t: float = 2.0, chunk: int = DEFAULT_CHUNK) -> dict[str, Any]:
    """JSON-ready geometry report of a multimodal embedding set.

    Returns ``{"modalities": {m: {"n", "dim", "uniformity", "effective_rank"}},
    "pairs": {"a/b": {"alignment", "gap", "centroid_cosine"}}}``; rows of a pair's two matrices must be paired
    samples (row i of ``embeddings[a]`` is the positive of row i of ``embeddings[b]``).
    """
    report: dict[str, Any] = {"modalities": {}, "pairs": {}}
    for name, emb in embeddings.items():
        matrix = _as_matrix(emb, f"embeddings[{name!r}]")
        report["modalities"][name] = {
            "n": int(matrix.shape[0]),
            "dim": int(matrix.shape[1]),
            "uniformity": uniformity(matrix, t=t, chunk=chunk) if matrix.shape[0] > 1 else None,
            "effective_rank": effective_rank(matrix),
        }
    for pair in pairs:
        if len(pair) != 2:
            raise ToolError(f"pairs entries must be (modality, modality), got {pair!r}")
        a, b = pair
        for m in (a, b):
            if m not in embeddings:
                raise ToolError(f"pair {pair!r} names modality {m!r}, not among the embeddings {sorted(embeddings)}")
        if embeddings[a].shape != embeddings[b].shape:
            raise ToolError(f"pair {pair!r} is not row-paired: shapes {tuple(embeddings[a].shape)} and "
                             f"{tuple(embeddings[b].shape)}")
        gap = modality_gap(embeddings[a], embeddings[b])
        report["pairs"][f"{a}/{b}"] = {"alignment": alignment(embeddings[a], embeddings[b], alpha=alpha),
                                       "gap": gap.distance, "centroid_cosine": gap.centroid_cosine}
    return report

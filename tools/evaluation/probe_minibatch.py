"""The linear probe's solver for large N: the same softmax regression as `tools.evaluation.probe`, fitted on
mini-batches on the evaluation device.

Objective (the full-batch solver's, and scikit-learn's):

    J(W, b) = (1/n) Σ_i CE(W x̂_i + b, y_i) + (λ/2)·||W||_F²,    x̂ = (x − μ) / σ,

with ``μ``, ``σ`` the training split's per-feature mean and standard deviation and the bias unpenalised.
scikit-learn's ``LogisticRegression(C)`` minimises ``C·Σ_i CE_i + ½||W||²``; dividing by ``C·n`` gives ``J`` with
``λ = 1/(C·n)``, i.e. ``C = 1/(λ·n)``.

Solver, in two phases:

1. **Adam on shuffled mini-batches** (``batch_size`` rows, ``epochs`` passes, seeded order), float32, each step
   minimising the batch's mean CE + (λ/2)·||W||² — the penalty inside the loss, whose expectation over batches is
   ``J``; AdamW's decoupled decay would, under Adam's per-coordinate scaling, minimise another objective — with the
   learning rate cosine-decayed from ``lr`` to 0;
2. **L-BFGS polish on J itself** (float64, strong-Wolfe line search, at most ``polish_iters`` iterations): each
   evaluation streams every row through the device in mini-batches and accumulates the exact full gradient, so the
   fit ends at J's minimiser, as the full-batch solver's does.

Memory: the features stay where they are (host, float32); the device holds ``W``, ``b``, one standardised batch and
its logits — bounded by the batch, not the data set. Agreement with scikit-learn on small N
(``tests/test_evaluation_scale.py``): the same test accuracy within 1 point, predicted probabilities within 1e-3,
centred weights within 1e-2 relative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

STATS_CHUNK = 16384  # rows per chunk of the statistics and predictions (float64: 16384 x 768 = 100 MB)


@dataclass(frozen=True)
class MinibatchOptions:
    batch_size: int = 4096
    epochs: int = 10
    lr: float = 0.01
    polish_iters: int = 100
    tol: float = 1e-9


def column_stats(x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 mean and (unbiased, floored at 1e-8) standard deviation of ``x[rows]``, two passes in chunks."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for chunk in rows.split(STATS_CHUNK):
        total += x[chunk].double().sum(0)
    mean = total / rows.numel()
    sq = torch.zeros_like(total)
    for chunk in rows.split(STATS_CHUNK):
        sq += ((x[chunk].double() - mean) ** 2).sum(0)
    return mean, (sq / max(rows.numel() - 1, 1)).sqrt().clamp_min(1e-8)


class _Rows:
    """Standardised batches of ``x[rows]`` on ``device`` in ``dtype``."""

    def __init__(self, x: Tensor, y: Tensor, mean: Tensor, std: Tensor, device: torch.device) -> None:
        self.x, self.y, self.device = x, y, device
        self.mean, self.std = mean.to(device), std.to(device)

    def batch(self, idx: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        xb = self.x[idx].to(self.device, non_blocking=True).to(dtype)
        return (xb - self.mean.to(dtype)) / self.std.to(dtype), self.y[idx].to(self.device, non_blocking=True)


def _adam(data: _Rows, rows: Tensor, num_classes: int, l2: float, opts: MinibatchOptions, seed: int
          ) -> tuple[Tensor, Tensor]:
    dim = data.x.shape[1]
    w = torch.zeros(num_classes, dim, device=data.device, requires_grad=True)
    b = torch.zeros(num_classes, device=data.device, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=opts.lr)
    gen = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(rows.numel() / opts.batch_size)
    total, step = opts.epochs * per_epoch, 0
    for _ in range(opts.epochs):
        for idx in rows[torch.randperm(rows.numel(), generator=gen)].split(opts.batch_size):
            for group in opt.param_groups:
                group["lr"] = opts.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            xb, yb = data.batch(idx, torch.float32)
            loss = F.cross_entropy(xb @ w.T + b, yb) + 0.5 * l2 * (w * w).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return w.detach(), b.detach()


def _polish(data: _Rows, rows: Tensor, l2: float, w0: Tensor, b0: Tensor, opts: MinibatchOptions
            ) -> tuple[Tensor, Tensor]:
    w = w0.double().clone().requires_grad_(True)
    b = b0.double().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=opts.polish_iters, tolerance_grad=opts.tol,
                            tolerance_change=opts.tol * 1e-3, history_size=20, line_search_fn="strong_wolfe")
    n = rows.numel()

    def closure() -> Tensor:
        opt.zero_grad()
        total = torch.zeros((), dtype=torch.float64, device=data.device)
        for idx in rows.split(opts.batch_size):
            xb, yb = data.batch(idx, torch.float64)
            loss = F.cross_entropy(xb @ w.T + b, yb, reduction="sum") / n
            loss.backward()
            total += loss.detach()
        penalty = 0.5 * l2 * (w * w).sum()
        penalty.backward()
        return total + penalty.detach()

    opt.step(closure)
    return w.detach(), b.detach()


def fit_minibatch(x: Tensor, y: Tensor, rows: Tensor, num_classes: int, l2: float, *, mean: Tensor, std: Tensor,
                  device: torch.device | str = "cpu", options: MinibatchOptions | None = None, seed: int = 0
                  ) -> tuple[Tensor, Tensor]:
    """``(W [C, D], b [C])`` (float64, on the host) minimising ``J`` over ``x[rows]`` standardised by ``mean`` /
    ``std`` (see the module docstring); ``x`` is never copied whole."""
    opts = options or MinibatchOptions()
    data = _Rows(x, y, mean.double(), std.double(), torch.device(device))
    with torch.enable_grad():
        w, b = _adam(data, rows, num_classes, l2, opts, seed)
        if opts.polish_iters > 0:
            w, b = _polish(data, rows, l2, w, b, opts)
    return w.double().cpu(), b.double().cpu()


@torch.no_grad()
def predict_chunked(x: Tensor, mean: Tensor, std: Tensor, w: Tensor, b: Tensor, *, chunk: int = STATS_CHUNK,
                    device: torch.device | str = "cpu") -> Tensor:
    """``argmax_c (W x̂ + b)_c`` for every row of ``x`` (standardised on the fly), ``chunk`` rows at a time."""
    dev = torch.device(device)
    mean, std, w, b = mean.double().to(dev), std.double().to(dev), w.double().to(dev), b.double().to(dev)
    out = [(((c.to(dev).double() - mean) / std) @ w.T + b).argmax(-1).cpu() for c in x.split(chunk)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def probabilities(x: Tensor, mean: Tensor, std: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``softmax(W x̂ + b)`` (float64), for comparisons with scikit-learn's ``predict_proba``."""
    return (((x.double() - mean) / std) @ w.double().T + b.double()).softmax(-1)

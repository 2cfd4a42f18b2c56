"""Linear probe of a frozen encoder (the CLIP / CLIP_benchmark protocol), always beside its random-init floor.

Protocol: features extracted once (cached); standardised with the training split's mean and std; a multinomial
logistic regression ``min_W,b  mean_i CE(W x_i + b, y_i) + (λ/2)·||W||²`` (bias unpenalised; this equals
scikit-learn's ``LogisticRegression(C = 1/(λ·n))``) fitted by full-batch L-BFGS in float64; ``λ`` chosen on a
stratified validation split of the training set (``val_fraction``) from a log-spaced sweep; then refitted on
train + validation and scored once on the test split. ``few_shot=k`` keeps k training samples per class.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmssl.tools.errors import ToolError

DEFAULT_L2_GRID = tuple(10.0**e for e in range(-6, 2))


def fit_logistic_regression(x: Tensor, y: Tensor, num_classes: int, l2: float, *, max_iter: int = 500,
                            tol: float = 1e-9) -> tuple[Tensor, Tensor]:
    """``(W [C, D], b [C])`` minimising ``mean CE + (l2/2)·||W||²`` (float64 L-BFGS, strong-Wolfe line search)."""
    x = x.double()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=tol * 1e-3,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def predict(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return (x.double() @ w.T + b).argmax(-1)


def stratified_split(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(train, val)`` taking ``fraction`` of every class with at least 2 samples into val."""
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in y.unique().tolist():
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_val = round(idx.numel() * fraction) if idx.numel() >= 2 else 0
        n_val = min(n_val, idx.numel() - 1)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def few_shot_subset(y: Tensor, k: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in y.unique().tolist():
        idx = (y == c).nonzero().squeeze(1)
        keep.append(idx[torch.randperm(idx.numel(), generator=g)[:k]])
    return torch.cat(keep).sort().values


@dataclass
class FittedProbe:
    """The refitted classifier: standardisation + ``W``, ``b`` over ``classes`` (apply to new features)."""

    mean: Tensor
    std: Tensor
    w: Tensor
    b: Tensor
    classes: list[str]

    def predict_index(self, x: Tensor) -> Tensor:
        return predict((x.double() - self.mean) / self.std, self.w, self.b)

    def accuracy(self, x: Tensor, labels: Sequence[str]) -> float:
        """Top-1 on ``labels`` (a label the probe never saw counts as wrong)."""
        index = {c: i for i, c in enumerate(self.classes)}
        y = torch.tensor([index.get(c, -1) for c in labels])
        return float((self.predict_index(x) == y).double().mean())


@dataclass
class ProbeResult:
    top1: float
    best_l2: float
    val_top1: dict[str, float]
    n_train: int
    n_val: int
    n_test: int
    dim: int
    classes: list[str] = field(default_factory=list)
    per_class_top1: dict[str, float] = field(default_factory=dict)
    chance_top1: float = 0.0
    probe: FittedProbe | None = None  # not serialised
    test_predictions: list[str] = field(default_factory=list)  # not serialised

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("probe")
        out.pop("test_predictions")
        return out


def linear_probe(train_x: Tensor, train_labels: Sequence[str], test_x: Tensor, test_labels: Sequence[str], *,
                 l2_grid: Sequence[float] = DEFAULT_L2_GRID, val_fraction: float = 0.2, few_shot: int | None = None,
                 seed: int = 0) -> ProbeResult:
    classes = sorted(set(train_labels))
    if len(classes) < 2:
        raise ToolError(f"the probe needs at least 2 classes in the training split, got {classes}")
    unseen = sorted(set(test_labels) - set(classes))
    if unseen:
        raise ToolError(f"test labels {unseen} never occur in the training split")
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[c] for c in train_labels])
    y_test = torch.tensor([index[c] for c in test_labels])
    x = train_x.double()
    if few_shot is not None:
        keep = few_shot_subset(y, few_shot, seed)
        x, y = x[keep], y[keep]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    x, xt = (x - mean) / std, (test_x.double() - mean) / std
    tr, va = stratified_split(y, val_fraction, seed)
    if va.numel() == 0:
        raise ToolError("the validation split is empty; use more training samples or a larger val_fraction")
    val_top1 = {}
    for l2 in l2_grid:
        w, b = fit_logistic_regression(x[tr], y[tr], len(classes), l2)
        val_top1[f"{l2:g}"] = float((predict(x[va], w, b) == y[va]).double().mean())
    best = max(val_top1.items(), key=lambda kv: (kv[1], float(kv[0])))  # ties -> stronger regularisation
    best_l2 = float(best[0])
    w, b = fit_logistic_regression(x, y, len(classes), best_l2)
    pred = predict(xt, w, b)
    correct = (pred == y_test).double()
    per_class = {c: float(correct[y_test == i].mean()) for i, c in enumerate(classes) if (y_test == i).any()}
    majority = Counter(test_labels).most_common(1)[0][1] / len(test_labels)
    return ProbeResult(
        top1=float(correct.mean()), best_l2=best_l2, val_top1=val_top1, n_train=int(tr.numel()),
        n_val=int(va.numel()), n_test=len(test_labels), dim=int(x.shape[1]), classes=classes,
        per_class_top1=per_class, chance_top1=round(majority, 4), probe=FittedProbe(mean, std, w, b, classes),
        test_predictions=[classes[i] for i in pred.tolist()],
    )


def labels_of(meta: dict[str, list[Any]], present: Tensor, field_name: str, where: str) -> tuple[Tensor, list[str]]:
    """Rows usable for the probe (modality present, label set) and their labels as strings."""
    if field_name not in meta:
        raise ToolError(f"{where}: no sample carries the label field {field_name!r} (fields: {sorted(meta)})")
    values = meta[field_name]
    keep = [i for i, v in enumerate(values) if v is not None and bool(present[i])]
    if not keep:
        raise ToolError(f"{where}: no sample has both the modality and the label {field_name!r}")
    return torch.tensor(keep), [str(values[i]) for i in keep]


def fmt_pct(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"

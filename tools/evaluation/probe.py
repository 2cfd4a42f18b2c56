"""Linear probe of a frozen encoder (the CLIP / CLIP_benchmark protocol), always beside its random-init floor.

Protocol: features extracted once (cached); standardised with the training split's mean and std; a multinomial
logistic regression ``min_W,b  mean_i CE(W x_i + b, y_i) + (λ/2)·||W||²`` (bias unpenalised; this equals
scikit-learn's ``LogisticRegression(C = 1/(λ·n))``) fitted by full-batch L-BFGS in float64; ``λ`` chosen on a
stratified validation split of the training set (``val_fraction``) from a log-spaced sweep; then refitted on
train + validation and scored once on the test split. ``few_shot=k`` keeps k training samples per class.

Two solvers of the same objective (``solver``): ``lbfgs`` (full batch, float64, on the host: exact and fast up to
~10^5 samples) and ``minibatch`` (`tools.evaluation.probe_minibatch`: Adam on mini-batches then an L-BFGS polish
with streamed full gradients, on the runtime's device, memory bounded by the batch); ``auto`` takes ``minibatch``
when ``N·D`` exceeds `FULL_BATCH_LIMIT` (ImageNet's 1.28 M × 768 does; 10k × 768 does not).
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
from mmssl.tools.evaluation.probe_minibatch import MinibatchOptions, column_stats, fit_minibatch, predict_chunked
from mmssl.tools.evaluation.runtime import Runtime, progress_over

DEFAULT_L2_GRID = tuple(10.0**e for e in range(-6, 2))
SOLVERS = ("auto", "lbfgs", "minibatch")
FULL_BATCH_LIMIT = 2**26  # N·D above which `auto` solves on mini-batches (the float64 copy alone is 512 MB)


def choose_solver(solver: str, n: int, dim: int) -> str:
    if solver not in SOLVERS:
        raise ToolError(f"--probe-solver must be one of {list(SOLVERS)}, got {solver!r}")
    if solver == "auto":
        return "minibatch" if n * dim > FULL_BATCH_LIMIT else "lbfgs"
    return solver


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
    chunk: int | None = None  # the mini-batch solver's probes predict in chunks of rows

    def predict_index(self, x: Tensor) -> Tensor:
        if self.chunk is not None:
            return predict_chunked(x, self.mean, self.std, self.w, self.b, chunk=self.chunk)
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
    solver: str = "lbfgs"
    probe: FittedProbe | None = None  # not serialised
    test_predictions: list[str] = field(default_factory=list)  # not serialised

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("probe")
        out.pop("test_predictions")
        return out


@dataclass
class _Fit:
    val_top1: dict[str, float]  # validation top-1 per λ
    best_l2: float
    probe: FittedProbe  # refitted on train + validation
    test_pred: Tensor  # class index per test row
    n_train: int
    n_val: int


def _best(val_top1: dict[str, float]) -> float:
    return float(max(val_top1.items(), key=lambda kv: (kv[1], float(kv[0])))[0])  # ties -> stronger regularisation


def _fit_lbfgs(train_x: Tensor, y: Tensor, test_x: Tensor, keep: Tensor | None, classes: list[str],
               l2_grid: Sequence[float], val_fraction: float, seed: int, runtime: Runtime | None) -> _Fit:
    x = train_x.double()
    if keep is not None:
        x, y = x[keep], y[keep]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    x, xt = (x - mean) / std, (test_x.double() - mean) / std
    tr, va = _split(y, val_fraction, seed)
    val_top1 = {}
    for l2 in progress_over(l2_grid, runtime, "probe λ sweep", len(l2_grid), "fits"):
        w, b = fit_logistic_regression(x[tr], y[tr], len(classes), l2)
        val_top1[f"{l2:g}"] = float((predict(x[va], w, b) == y[va]).double().mean())
    w, b = fit_logistic_regression(x, y, len(classes), _best(val_top1))
    return _Fit(val_top1, _best(val_top1), FittedProbe(mean, std, w, b, classes), predict(xt, w, b), tr.numel(),
                va.numel())


def _fit_minibatch(train_x: Tensor, y: Tensor, test_x: Tensor, keep: Tensor | None, classes: list[str],
                   l2_grid: Sequence[float], val_fraction: float, seed: int, runtime: Runtime | None,
                   options: MinibatchOptions | None) -> _Fit:
    base = keep if keep is not None else torch.arange(train_x.shape[0])
    tr, va = _split(y[base], val_fraction, seed)
    device = runtime.device if runtime is not None else torch.device("cpu")
    mean, std = column_stats(train_x, base)
    opts = options or MinibatchOptions()

    def fit(rows: Tensor, l2: float) -> tuple[Tensor, Tensor]:
        return fit_minibatch(train_x, y, rows, len(classes), l2, mean=mean, std=std, device=device, options=opts,
                             seed=seed)

    val_top1 = {}
    for l2 in progress_over(l2_grid, runtime, "probe λ sweep (mini-batch)", len(l2_grid), "fits"):
        w, b = fit(base[tr], l2)
        pred = predict_chunked(train_x[base[va]], mean, std, w, b, device=device)
        val_top1[f"{l2:g}"] = float((pred == y[base[va]]).double().mean())
    w, b = fit(base, _best(val_top1))
    probe = FittedProbe(mean, std, w, b, classes, chunk=opts.batch_size)
    return _Fit(val_top1, _best(val_top1), probe, predict_chunked(test_x, mean, std, w, b, device=device),
                tr.numel(), va.numel())


def _split(y: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    tr, va = stratified_split(y, val_fraction, seed)
    if va.numel() == 0:
        raise ToolError("the validation split is empty; use more training samples or a larger val_fraction")
    return tr, va


def linear_probe(train_x: Tensor, train_labels: Sequence[str], test_x: Tensor, test_labels: Sequence[str], *,
                 l2_grid: Sequence[float] = DEFAULT_L2_GRID, val_fraction: float = 0.2, few_shot: int | None = None,
                 seed: int = 0, solver: str = "auto", runtime: Runtime | None = None,
                 minibatch: MinibatchOptions | None = None) -> ProbeResult:
    """The probe protocol of the module docstring on ``train_x`` / ``test_x`` (``[N, D]``, any float dtype)."""
    classes = sorted(set(train_labels))
    if len(classes) < 2:
        raise ToolError(f"the probe needs at least 2 classes in the training split, got {classes}")
    unseen = sorted(set(test_labels) - set(classes))
    if unseen:
        raise ToolError(f"test labels {unseen} never occur in the training split")
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[c] for c in train_labels])
    y_test = torch.tensor([index[c] for c in test_labels])
    keep = few_shot_subset(y, few_shot, seed) if few_shot is not None else None
    n = keep.numel() if keep is not None else y.numel()
    chosen = choose_solver(solver, n, int(train_x.shape[1]))
    if chosen == "lbfgs":
        fit = _fit_lbfgs(train_x, y, test_x, keep, classes, l2_grid, val_fraction, seed, runtime)
    else:
        fit = _fit_minibatch(train_x, y, test_x, keep, classes, l2_grid, val_fraction, seed, runtime, minibatch)
    correct = (fit.test_pred == y_test).double()
    per_class = {c: float(correct[y_test == i].mean()) for i, c in enumerate(classes) if (y_test == i).any()}
    majority = Counter(test_labels).most_common(1)[0][1] / len(test_labels)
    return ProbeResult(
        top1=float(correct.mean()), best_l2=fit.best_l2, val_top1=fit.val_top1, n_train=int(fit.n_train),
        n_val=int(fit.n_val), n_test=len(test_labels), dim=int(train_x.shape[1]), classes=classes,
        per_class_top1=per_class, chance_top1=round(majority, 4), solver=chosen, probe=fit.probe,
        test_predictions=[classes[i] for i in fit.test_pred.tolist()],
    )


def label_values(meta: dict[str, list[Any]], present: Tensor, field_name: str, where: str) -> tuple[Tensor, list[Any]]:
    """Rows usable for a classifier (modality present, label set) and their label values as stored (JSON)."""
    if field_name not in meta:
        raise ToolError(f"{where}: no sample carries the label field {field_name!r} (fields: {sorted(meta)})")
    values = meta[field_name]
    keep = [i for i, v in enumerate(values) if v is not None and bool(present[i])]
    if not keep:
        raise ToolError(f"{where}: no sample has both the modality and the label {field_name!r}")
    return torch.tensor(keep), [values[i] for i in keep]


def labels_of(meta: dict[str, list[Any]], present: Tensor, field_name: str, where: str) -> tuple[Tensor, list[str]]:
    """Rows usable for the probe (modality present, label set) and their labels as strings."""
    rows, values = label_values(meta, present, field_name, where)
    return rows, [str(v) for v in values]


def fmt_pct(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"

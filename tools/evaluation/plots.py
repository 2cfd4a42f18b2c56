"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed). Each function takes the JSON-ready
result dicts the evaluations write, so plots can be redrawn from ``results.json`` alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(out)
    _pyplot().close(fig)
    return out


def plot_probe_sweep(probes: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Validation top-1 vs the L2 strength for each probe (``{name: {"val_top1": {l2: acc}, "best_l2",
    "top1"}}``); the chosen L2 marked, the test top-1 in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, result in probes.items():
        pairs = sorted((float(k), v) for k, v in result["val_top1"].items())
        line, = ax.plot([p[0] for p in pairs], [100 * p[1] for p in pairs], marker="o",
                        label=f"{name} (test {100 * result['top1']:.1f}%)")
        best = float(result["best_l2"])
        ax.plot([best], [100 * dict(pairs)[best]], marker="*", markersize=14, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("L2 regularisation λ")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title or "linear probe: validation accuracy vs regularisation (★ chosen)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bars(groups: Mapping[str, Mapping[str, float]], path: str | Path, *, ylabel: str, title: str,
              percent: bool = True) -> Path:
    """Grouped bars: ``{group (x tick): {series: value}}`` (e.g. retrieval R@1/5/10 per direction and model)."""
    plt = _pyplot()
    names = list(groups)
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(names) * max(1, len(series)) / 2), 4))
    for i, s in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        ys = [(100 if percent else 1) * groups[g].get(s, float("nan")) for g in names]
        ax.bar(xs, ys, width=width, label=s)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], levels: Sequence[float], path: str | Path, *,
                ylabel: str, title: str, removed: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """One panel per metric: ``{metric: {curve name: values at levels}}``; ``removed`` adds the value with each
    modality removed entirely as a dashed horizontal line (``{metric: {modality: value}}``)."""
    plt = _pyplot()
    metrics = list(curves)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for name, values in curves[metric].items():
            ax.plot(list(levels)[: len(values)], [100 * v for v in values], marker="o", label=name)
        for j, (modality, value) in enumerate((removed or {}).get(metric, {}).items()):
            ax.axhline(100 * value, linestyle="--", linewidth=1, color=f"C{(j + 5) % 10}",
                       label=f"{modality} removed")
        ax.set_xlabel("noise level")
        ax.set_ylabel(ylabel)
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)

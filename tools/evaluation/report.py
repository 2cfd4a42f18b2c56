"""Tables and plots of ``mmssl evaluate`` results, and ``mmssl compare`` (several runs side by side)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmssl.data_pipelines.shards import atomic_write_text
from mmssl.pretrain.rundir import EVAL
from mmssl.tools.errors import ToolError
from mmssl.tools.evaluation.plots import plot_bars, plot_curves, plot_probe_sweep
from mmssl.tools.evaluation.probe import fmt_pct

RESULTS = "results.json"


def write_plots(results: dict[str, Any], out: Path) -> dict[str, str]:
    plots: dict[str, str] = {}
    pre = results.get("pretrained", {})
    if pre.get("probe"):
        probes = {f"{name}": r for name, r in pre["probe"].items()}
        floor = results.get("random_init", {}).get("probe", {})
        probes.update({f"{name} (random init)": r for name, r in floor.items()})
        plots["probe"] = str(plot_probe_sweep(probes, out / "probe_sweep.png"))
    if pre.get("retrieval"):
        groups: dict[str, dict[str, float]] = {}
        for variant in ("pretrained", "random_init"):
            for entry in results.get(variant, {}).get("retrieval", {}).values():
                for direction, recall in entry.items():
                    if "->" in direction:
                        for k, v in recall.items():
                            groups.setdefault(f"{direction} {k}", {})[variant] = v
                for direction, recall in entry.get("itm_rerank", {}).items():
                    if "->" in direction:
                        for k, v in recall.items():
                            groups.setdefault(f"{direction} {k}", {})[f"{variant} + ITM re-rank"] = v
        plots["retrieval"] = str(plot_bars(groups, out / "retrieval.png", ylabel="recall (%)",
                                           title="retrieval Recall@K"))
    rob = results.get("robustness")
    if rob and rob.get("curves"):
        plots["robustness"] = str(plot_curves(
            rob["curves"], rob["levels"], out / "robustness.png", ylabel="metric (%)",
            title=f"robustness (score {rob['score']['score']:.3f})", removed=rob.get("removed")))
    return plots


def format_evaluation(results: dict[str, Any]) -> str:
    lines = [f"evaluation of {results['model']} ({results.get('family')}, modalities {results.get('modalities')})",
             "-" * 96]
    pre, rnd = results.get("pretrained", {}), results.get("random_init", {})

    def row(name: str, a: Any, b: Any, note: str = "") -> None:
        lines.append(f"  {name:<38} {fmt_pct(a) if isinstance(a, float) else str(a):>10} "
                     f"{fmt_pct(b) if isinstance(b, float) else ('' if b is None else str(b)):>12}  {note}")

    lines.append(f"  {'metric':<38} {'pretrained':>10} {'random init':>12}")
    for name, r in pre.get("probe", {}).items():
        floor = rnd.get("probe", {}).get(name, {}).get("top1")
        row(f"probe top-1 [{name}]", r["top1"], floor, f"λ={r['best_l2']:g}, n_test {r['n_test']}, "
            f"majority {fmt_pct(r['chance_top1'])}" + (", mini-batch solver" if r.get("solver") == "minibatch" else ""))
    for pair, entry in pre.get("retrieval", {}).items():
        floor = rnd.get("retrieval", {}).get(pair, {})
        for direction, recall in entry.items():
            if "->" in direction:
                fr = floor.get(direction, {})
                row(f"{direction} R@1/5/10", "/".join(fmt_pct(recall[k]) for k in ("R@1", "R@5", "R@10")),
                    "/".join(fmt_pct(fr[k]) for k in ("R@1", "R@5", "R@10")) if fr else None,
                    f"n {entry['n']}, chance R@1 {fmt_pct(entry['chance_R@1'])}")
        for direction, recall in entry.get("itm_rerank", {}).items():
            if "->" in direction:
                row(f"{direction} R@1 ITM re-ranked", recall.get("R@1"), None, f"top-{entry['itm_rerank']['k']}")
    for m, z in pre.get("zero_shot", {}).items():
        if "top1" not in z:  # skipped: integer labels without --prompts
            row(f"zero-shot top-1 [{m}]", "skipped", None, z.get("skipped", ""))
            continue
        row(f"zero-shot top-1 [{m}]", z["top1"], rnd.get("zero_shot", {}).get(m, {}).get("top1"),
            f"{z.get('num_classes', '')} classes")
    diag = pre.get("diagnostics", {})
    for pair, d in diag.get("pairs", {}).items():
        row(f"alignment / modality gap [{pair}]", f"{d['alignment']:.3f} / {d['gap']:.3f}", None)
    for m, d in diag.get("modalities", {}).items():
        row(f"uniformity / effective rank [{m}]", f"{d['uniformity']:.2f} / {d['effective_rank']:.1f}", None,
            f"of dim {d.get('dim', '')}")
    pid = pre.get("pid", {})
    if pid:
        row(f"PID R/U1/U2/S bits {pid['modalities']}",
            "/".join(f"{pid[k]:.3f}" for k in ("redundancy", "unique1", "unique2", "synergy")), None,
            f"n {pid.get('n_samples', '')}, from the unimodal probes' predictions")
    rob = results.get("robustness")
    if rob:
        row("robustness score", f"{rob['score']['score']:.3f}", None, "mean relative robustness over curves")
        for m, drop in rob.get("removal_drop", {}).items():
            row(f"fused probe drop, {m} removed", drop, None)
    lines.append("-" * 96)
    for name, path in results.get("plots", {}).items():
        lines.append(f"  plot {name:<10} {path}")
    if "results_file" in results:
        lines.append(f"  results    {results['results_file']}")
    return "\n".join(lines)


def _find_results(path: str | Path) -> Path:
    p = Path(path)
    for candidate in (p, p / RESULTS, p / EVAL / RESULTS):
        if candidate.is_file():
            return candidate
    raise ToolError(f"no {RESULTS} under {p} (run `mmssl evaluate` first; looked in {p} and {p / 'eval'})")


def headline(results: dict[str, Any]) -> dict[str, float]:
    """The comparable numbers of one evaluation, flat."""
    out: dict[str, float] = {}
    pre = results.get("pretrained", {})
    for name, r in pre.get("probe", {}).items():
        out[f"probe top-1 [{name}]"] = r["top1"]
    for pair, entry in pre.get("retrieval", {}).items():
        out[f"R@1 mean [{pair}]"] = entry["mean"]["R@1"]
    for m, z in pre.get("zero_shot", {}).items():
        if "top1" in z:
            out[f"zero-shot top-1 [{m}]"] = z["top1"]
    if results.get("robustness"):
        out["robustness score"] = results["robustness"]["score"]["score"]
    return out


def compare(paths: Sequence[str | Path], out: str | Path | None = None) -> tuple[dict[str, Any], str]:
    """Line several evaluations up: ``(table as dict, printed table)``; with ``out``, also JSON + bar plot."""
    if len(paths) < 1:
        raise ToolError("mmssl compare needs at least one evaluation")
    columns = {}
    for path in paths:
        file = _find_results(path)
        columns[str(path)] = headline(json.loads(file.read_text()))
    metrics = list(dict.fromkeys(m for col in columns.values() for m in col))
    names = list(columns)
    width = max(12, *(len(n) for n in names))
    lines = [f"  {'metric':<34}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for metric in metrics:
        cells = []
        for n in names:
            v = columns[n].get(metric)
            cells.append("-" if v is None else (f"{v:.3f}" if metric == "robustness score" else fmt_pct(v)))
        lines.append(f"  {metric:<34}" + "".join(f"{c:>{width + 2}}" for c in cells))
    table = {"runs": names, "metrics": {m: {n: columns[n].get(m) for n in names} for m in metrics}}
    if out:
        target = Path(out)
        atomic_write_text(target / "compare.json", json.dumps(table, indent=2) + "\n")
        plot_bars({m: {n: v for n, v in table["metrics"][m].items() if v is not None}
                   for m in metrics if m != "robustness score"}, target / "compare.png", ylabel="%",
                  title="mmssl compare")
        lines.append(f"  written: {target / 'compare.json'}, {target / 'compare.png'}")
    return table, "\n".join(lines)

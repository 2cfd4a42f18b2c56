"""``mmssl report RUN_DIR``: the run's training figures and its evaluations in one table and in ``summary.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmssl.data_pipelines.shards import atomic_write_text
from mmssl.pretrain.rundir import SUMMARY
from mmssl.tools.errors import ToolError
from mmssl.tools.evaluation.probe import fmt_pct

EVAL_DIR = "eval"
PROBE_JSON = "probe.json"
RETRIEVAL_JSON = "retrieval.json"


def build_report(run_dir: str | Path) -> dict[str, Any]:
    run = Path(run_dir)
    summary_file = run / SUMMARY
    if not summary_file.is_file():
        raise ToolError(f"{summary_file} is missing; has the run finished?")
    summary = json.loads(summary_file.read_text())
    probe_file, retrieval_file = run / EVAL_DIR / PROBE_JSON, run / EVAL_DIR / RETRIEVAL_JSON
    if probe_file.is_file():
        probe = json.loads(probe_file.read_text())
        summary["probe_top1_pretrained"] = probe["pretrained"]["top1"]
        summary["probe_top1_random"] = probe.get("random_init", {}).get("top1")
        summary["probe"] = {"label": probe["label"], "modality": probe["modality"], "file": str(probe_file)}
    if retrieval_file.is_file():
        retrieval = json.loads(retrieval_file.read_text())
        summary["recall_at_1_pretrained"] = retrieval["pretrained"]["mean"]["R@1"]
        summary["recall_at_1_random"] = retrieval.get("random_init", {}).get("mean", {}).get("R@1")
        summary["retrieval"] = {k: retrieval[k] for k in ("pretrained", "random_init") if k in retrieval}
        summary["retrieval"]["file"] = str(retrieval_file)
    atomic_write_text(summary_file, json.dumps(summary, indent=2) + "\n")
    return summary


def _device(summary: dict[str, Any]) -> str:
    """``cpu (AVX2)`` / ``cuda (NVIDIA H200)``: the device and what its numbers depend on (see `hardware_summary`)."""
    hardware = summary.get("hardware") or {}
    detail = hardware.get("gpu") or hardware.get("cpu_capability")
    return f"{summary.get('device')} ({detail})" if detail else f"{summary.get('device')}"


def format_report(summary: dict[str, Any], run_dir: str | Path) -> str:
    run = Path(run_dir)
    rows = [
        ("steps", str(summary.get("steps")), ""),
        ("samples/s", f"{summary.get('samples_per_s')}", f"({summary.get('world_size')} ranks, "
                                                          f"{_device(summary)}, {summary.get('precision')})"),
        ("final loss", f"{summary.get('final_loss')}", f"(mean of the last {summary.get('final_loss_window_steps')} "
                                                       "steps)"),
    ]
    if "probe_top1_pretrained" in summary:
        rows.append(("probe top-1", fmt_pct(summary["probe_top1_pretrained"]),
                     f"random init {fmt_pct(summary.get('probe_top1_random'))}   "
                     f"(label '{summary['probe']['label']}', {summary['probe']['modality']} encoder)"))
    if "recall_at_1_pretrained" in summary:
        rows.append(("retrieval R@1", fmt_pct(summary["recall_at_1_pretrained"]),
                     f"random init {fmt_pct(summary.get('recall_at_1_random'))}   (held-out, mean of both "
                     "directions)"))
    width = max(len(r[0]) for r in rows)
    lines = [f"mmssl run {run}", "-" * 78]
    lines += [f"  {name:<{width}}  {value:>8}  {note}" for name, value, note in rows]
    lines += ["-" * 78,
              f"  run directory  {run}",
              f"  logs           {run / 'logs'}  (metrics.jsonl, tensorboard/)",
              f"  loss curve     {summary.get('loss_curve', run / 'loss_curve.png')}",
              f"  summary        {run / 'summary.json'}"]
    return "\n".join(lines)

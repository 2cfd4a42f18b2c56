"""Benchmark of the quickstart model: training throughput, step-time split and peak RSS per rank at ZeRO 0 and 2,
and the loader alone, in one process so the ratios compare like with like.

    python tools/bench_pretrain.py [--steps 40] [--nproc 2] [--stages 0 2] [--json out.json] [key=value ...]

Training figures come from real `mmssl pretrain` runs (DeepSpeed, the recipe's data on real shards); the first
step (start-up) is excluded. The loader figure is rank 0's ShardStream through its DataLoader with the recipe's
worker count, decoding included, and nothing else. Ratios are against the first stage listed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def train_run(recipe: str, stage: int, steps: int, nproc: int, overrides: list[str], out: Path) -> dict[str, Any]:
    run = out / f"zero{stage}"
    cmd = [sys.executable, "-m", "tools.cli", "pretrain", recipe, "--nproc", str(nproc), "--run-dir", str(run),
           "--overwrite", f"train.steps={steps}", f"train.zero_stage={stage}", "train.ckpt_every=0",
           f"train.log_every={steps}", "train.tensorboard=false", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark run failed (ZeRO-{stage}):\n{proc.stderr[-3000:]}")
    return json.loads((run / "summary.json").read_text())


def loader_rate(recipe_name: str, overrides: list[str], nproc: int, batches: int) -> float:
    from pretrain.data import build_loader
    from pretrain.recipe import load_recipe

    recipe = load_recipe(recipe_name, overrides)
    loader = iter(build_loader(recipe, rank=0, world_size=nproc, start_batch=0))
    next(loader)  # worker start-up
    start = time.perf_counter()
    n = sum(len(next(loader)) for _ in range(batches))
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--loader-batches", type=int, default=30)
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {s: train_run(args.recipe, s, args.steps, args.nproc, args.overrides, Path(tmp)) for s in args.stages}
    loader = loader_rate(args.recipe, args.overrides, args.nproc, args.loader_batches)
    ref = runs[args.stages[0]]
    rows = []
    for stage, s in runs.items():
        split = s["step_time_split_s"]
        rows.append({
            "config": f"ZeRO-{stage} {s['precision']} x{s['world_size']} ranks",
            "samples_per_s": s["samples_per_s"],
            "vs_ref": s["samples_per_s"] / ref["samples_per_s"],
            **{f"{k}_ms": 1000 * v for k, v in split.items()},
            "peak_rss_mb": s["peak_rss_mb_per_rank"],
        })
    per_rank_need = ref["samples_per_s"] / ref["world_size"]
    print(f"\n### {args.recipe}: {args.steps} steps, global batch {ref['global_batch']}, {ref['device']}\n")
    print(f"| config | samples/s | vs ZeRO-{args.stages[0]} | data wait ms | forward ms | backward ms | optimizer ms "
          "| peak RSS MB per rank |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['config']} | {r['samples_per_s']:.1f} | {r['vs_ref']:.2f} | {r['data_wait_ms']:.1f} | "
              f"{r['forward_ms']:.1f} | {r['backward_ms']:.1f} | {r['optimizer_ms']:.1f} | "
              f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mb'])} |")
    print(f"| loader only (rank 0, decode incl.) | {loader:.1f} per rank | {loader / per_rank_need:.1f}x what "
          f"one rank consumes | | | | | |")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": rows, "loader_samples_per_s_per_rank": loader,
                                               "consumed_per_rank": per_rank_need}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

"""Benchmark of the quickstart model: training throughput, step-time split and peak RSS per rank at ZeRO 0 and 2,
and the loader alone, in one process so the ratios compare like with like.

    mmssl bench loader [--steps 40] [--nproc 2] [--stages 0 2] [--json out.json] [key=value ...]

Training figures come from real `mmssl pretrain` runs (DeepSpeed, the recipe's data on real shards); the first
step (start-up) is excluded. The loader figures are rank 0's ShardStream through its DataLoader for each
``--loader-workers`` setting, decoding included, and nothing else, against what one training rank consumed; the
resume figure times a stream resumed at ``--resume-at`` from its recorded position vs by replaying. Ratios are
against the first stage listed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmssl.pretrain.rundir import SUMMARY


def train_run(recipe: str, stage: int, steps: int, nproc: int, overrides: list[str], out: Path) -> dict[str, Any]:
    run = out / f"zero{stage}"
    cmd = [sys.executable, "-m", "mmssl", "pretrain", recipe, "--nproc", str(nproc), "--run-dir", str(run),
           "--overwrite", f"train.steps={steps}", f"train.zero_stage={stage}", "train.ckpt_every=0",
           f"train.log_every={steps}", "train.tensorboard=false", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark run failed (ZeRO-{stage}):\n{proc.stderr[-3000:]}")
    return json.loads((run / SUMMARY).read_text())


def loader_rate(recipe_name: str, overrides: list[str], nproc: int, batches: int) -> float:
    from mmssl.pretrain.data import build_loader
    from mmssl.pretrain.recipe import load_recipe

    recipe = load_recipe(recipe_name, overrides)
    loader = iter(build_loader(recipe, rank=0, world_size=nproc, start_batch=0))
    next(loader)  # worker start-up
    start = time.perf_counter()
    n = sum(len(next(loader)) for _ in range(batches))
    return n / (time.perf_counter() - start)


def resume_cost(recipe_name: str, overrides: list[str], nproc: int, at: int) -> dict[str, float]:
    """Seconds until rank 0's stream yields batch ``at`` when resumed from recorded positions vs by replaying."""
    from mmssl.pretrain.data import build_stream
    from mmssl.pretrain.recipe import load_recipe

    recipe = load_recipe(recipe_name, overrides)
    positions: dict[int, dict] = {}
    stream = iter(build_stream(recipe, rank=0, world_size=nproc, start_batch=0))
    for _ in range(at):
        batch = next(stream)
        positions[batch.position["stream"]] = batch.position
    costs = {}
    for mode, known in (("position", positions), ("replay", None)):
        start = time.perf_counter()
        next(iter(build_stream(recipe, rank=0, world_size=nproc, start_batch=at, positions=known)))
        costs[mode] = time.perf_counter() - start
    return costs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmssl bench loader", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--loader-batches", type=int, default=30)
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2],
                        help="data.num_workers settings for the loader-only rows")
    parser.add_argument("--resume-at", type=int, default=40, help="batch at which to time a resumed stream")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {s: train_run(args.recipe, s, args.steps, args.nproc, args.overrides, Path(tmp)) for s in args.stages}
    from mmssl.pretrain.recipe import load_recipe

    data = load_recipe(args.recipe, args.overrides).data
    loaders = {w: loader_rate(args.recipe, [*args.overrides, f"data.num_workers={w}"], args.nproc,
                              args.loader_batches) for w in args.loader_workers}
    resumed = resume_cost(args.recipe, args.overrides, args.nproc, args.resume_at)
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
    print(f"\nLoader alone (rank 0 of {args.nproc}, decoding included; batch {data.batch_size}, "
          f"streams_per_rank {data.streams_per_rank}, shuffle_buffer {data.shuffle_buffer}, prefetch_factor "
          f"{data.prefetch_factor}) against what one training rank consumes ({per_rank_need:.1f} samples/s at "
          f"ZeRO-{args.stages[0]}):\n")
    print("| data.num_workers | loader samples/s per rank | x training consumption |")
    print("|---:|---:|---:|")
    for w, rate in loaders.items():
        print(f"| {w} | {rate:.1f} | {rate / per_rank_need:.1f}x |")
    print(f"\nResuming rank 0's stream at batch {args.resume_at}: first batch after {resumed['position']:.2f} s "
          f"from the recorded position, {resumed['replay']:.2f} s by replaying "
          f"({resumed['replay'] / resumed['position']:.1f}x).")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": rows, "loader_samples_per_s_per_rank": loaders,
                                               "consumed_per_rank": per_rank_need, "resume_s": resumed}, indent=2))


if __name__ == "__main__":
    main()

"""``mmssl bench flip``: the training-step speed-up of FLIP patch dropout (Li et al. 2023, "Scaling Language-Image
Pre-training via Masking") at 0 / 50 / 75 % on the CLIP model of ``mmssl bench --compare open_clip``.

One process, one rank: for each rate the same recipe with ``model.image.patch_dropout`` set builds mmssl's trainer
(model, objectives, DeepSpeed engine at ZeRO-0), and each step is the trainer's step on the same pre-decoded
Fashion-MNIST batches (`tools.bench.clip_sides.MmsslSide`). Trials alternate between the rates; the first is
warm-up; samples/s is the median of the others. Two speed-ups are reported against rate 0: the whole step
(image + text towers, loss, optimizer), and the image tower alone (its forward + backward on the same batch, timed in
isolation), the part FLIP shortens. The table also gives each rate's ceiling (Amdahl's law: the step speed-up if
only the image tower shrank, in exact proportion to its tokens) and, at rate 0, the step's split between the
image tower and the text tower.

    mmssl bench flip [--rates 0 0.5 0.75] [--steps 5] [--trials 6] [--batch 64] [--image-size 64]
                     [--patch-size 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from mmssl.tools.bench.clip_sides import ClipSize, MmsslSide, decoded_batches, prepare
from mmssl.tools.bench.device import bench_device, check_counts, timed
from mmssl.tools.bench.open_clip import run_and_report
from mmssl.tools.errors import ToolError


def with_patch_dropout(recipe: Path, rate: float) -> Path:
    raw = yaml.safe_load(recipe.read_text())
    raw["model"]["image"]["patch_dropout"] = rate
    out = recipe.with_name(f"{recipe.stem}-flip{round(100 * rate)}.yaml")
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def tower_seconds(side: MmsslSide, batch: Any, modality: str, repeat: int) -> float:
    """Median seconds of one tower's forward + backward on ``batch`` as the trainer feeds it (training mode)."""
    tower = side.model.model.towers[modality]
    [(_, moved)] = side.trainer.feed.take([batch])
    x = moved.inputs[modality]

    def once() -> None:
        tower(x).features.float().square().mean().backward()

    times = [timed(once, side.device) for _ in range(repeat + 1)]
    tower.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def amdahl_ceiling(step_s: float, tower_s: float, kept: float) -> float:
    """The step speed-up if only the image tower shrank, and in exact proportion to its tokens: ``t / (t - I·(1 -
    kept))`` (``t`` the step at rate 0, ``I`` its image tower, ``kept`` the fraction of image tokens kept)."""
    return step_s / (step_s - tower_s * (1 - kept))


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    size = ClipSize(image_size=args.image_size, patch_size=args.patch_size)
    base = prepare(workdir, size, args.batch, "fp32", args.limit)
    batches = decoded_batches(base, min(16, args.steps * args.trials))
    sides = {rate: MmsslSide(with_patch_dropout(base, rate), workdir / f"run-{rate}") for rate in args.rates}
    rates: dict[float, list[float]] = {r: [] for r in args.rates}
    for trial in range(args.trials):
        chunk = [batches[(trial * args.steps + i) % len(batches)] for i in range(args.steps)]
        samples = sum(len(b) for b in chunk)
        for rate, side in sides.items():
            rates[rate].append(samples / side.run(chunk))
    rows = []
    ref = statistics.median(rates[args.rates[0]][1:])
    grid = (size.image_size // size.patch_size) ** 2
    first = sides[args.rates[0]]
    tower_ref = tower_seconds(first, batches[0], "image", args.steps)
    text_s = tower_seconds(first, batches[0], "text", args.steps)
    step_ref = args.batch / ref
    for rate, side in sides.items():
        tower_s = tower_seconds(side, batches[0], "image", args.steps) if side is not first else tower_ref
        median = statistics.median(rates[rate][1:])
        tokens = 1 + int(grid * (1 - rate))
        rows.append({"patch_dropout": rate, "image_tokens": tokens, "samples_per_s": median,
                     "step_speedup": median / ref, "image_tower_ms": 1000 * tower_s,
                     "image_tower_speedup": tower_ref / tower_s,
                     "ceiling": amdahl_ceiling(step_ref, tower_ref, tokens / (1 + grid)), "trials": rates[rate][1:]})
    return {"config": {"image_size": size.image_size, "patch_size": size.patch_size, "width": size.width,
                       "depth": size.depth, "batch": args.batch, "steps": args.steps, "trials": args.trials,
                       "threads": args.threads}, "rows": rows,
            "rate0": {"step_ms": 1000 * step_ref, "image_tower_ms": 1000 * tower_ref, "text_tower_ms": 1000 * text_s}}


def table(result: dict[str, Any]) -> str:
    c, r0 = result["config"], result["rate0"]
    lines = [f"### FLIP patch dropout: CLIP ViT {c['width']}w x {c['depth']}L, {c['image_size']} px / patch "
             f"{c['patch_size']}, batch {c['batch']}, {c['threads']} threads, 1 rank, CPU", "",
             f"at 0 %: step {r0['step_ms']:.0f} ms, image tower fwd+bwd {r0['image_tower_ms']:.0f} ms "
             f"({r0['image_tower_ms'] / r0['step_ms']:.0%} of the step), text tower {r0['text_tower_ms']:.0f} ms", "",
             "| patch dropout | image tokens | samples/s | step speed-up | ceiling (Amdahl) | image tower fwd+bwd ms "
             "| tower speed-up |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {100 * r['patch_dropout']:.0f} % | {r['image_tokens']} | {r['samples_per_s']:.1f} "
                     f"| {r['step_speedup']:.2f}x | {r['ceiling']:.2f}x | {r['image_tower_ms']:.1f} "
                     f"| {r['image_tower_speedup']:.2f}x |")
    lines += ["", "ceiling: the step speed-up if only the image tower shrank, in proportion to its tokens"]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmssl bench flip", description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=1024)
    p.add_argument("--image-size", type=int, default=ClipSize.image_size)
    p.add_argument("--patch-size", type=int, default=ClipSize.patch_size)
    p.add_argument("--json", default=None)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    if any(not 0 <= r < 1 for r in args.rates):
        raise ToolError(f"--rates must be in [0, 1), got {args.rates}")
    check_counts(args, ("steps", "batch", "threads", "limit", "image_size", "patch_size"))
    if args.image_size % args.patch_size:
        raise ToolError(f"--image-size {args.image_size} is not a multiple of --patch-size {args.patch_size}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bench_device()  # DeepSpeed's CPU accelerator only when there is no GPU
    return run_and_report(args, run, table)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

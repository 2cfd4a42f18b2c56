"""``mmssl bench layout``: what channels-last inputs (``train.channels_last``, `architectures.layout`) do to the speed
of convolutional towers, against the NCHW run of the same tower in the same process.

Part 1, towers: each timm tower below, random init, on one random batch of its input shape, timed NCHW and NHWC
in alternation (``--trials``, the first a warm-up; the median of the others), forward + backward of
``pooled.square().mean()`` (a trained tower) or forward alone under ``no_grad`` (a frozen one, as a stitched
model's vision tower runs), in fp32 and in bf16 (weights and inputs in bf16, as DeepSpeed's bf16 runs them):

* ``resnet10t`` over ``[32, 1, 64, 192]`` log-mel spectrograms (the quickstart's audio tower, its widths),
* ``resnet18`` on 64 and 224 px images, ``resnet50`` on 128 px,
* ``efficientnet_lite0`` at 224 px, frozen (the stitched recipes' vision tower) and trained,
* ``convnext_atto`` at 224 px, and ``vit_tiny_patch16_224`` (one convolution, the patch embedding: ``auto`` leaves
  ViTs NCHW; the row shows why that costs nothing).

Part 2, a training step: ``--recipe`` (default ``quickstart``; its shards must exist: ``make quickstart`` writes
them) built twice by the trainer on 1 rank (`tools.bench.clip_sides.MmsslSide`: the trainer's feed and DeepSpeed
step), ``train.channels_last`` false against the default (auto), stepping the same decoded batches in alternation.

    mmssl bench layout [--trials 6] [--repeat 3] [--precisions fp32 bf16] [--recipe quickstart] [--steps 4]
                       [--no-step] [--only ARCH ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mmssl.tools.bench.device import bench_device, check_counts, timed
from mmssl.tools.errors import ToolError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    arch: str
    model_args: dict[str, Any]
    shape: tuple[int, int, int, int]
    train: bool = True

    @property
    def label(self) -> str:
        return f"{self.arch} {'x'.join(map(str, self.shape))} {'fwd+bwd' if self.train else 'fwd (frozen)'}"


CASES = (
    Case("resnet10t", {"in_chans": 1, "channels": [32, 64, 128, 256]}, (32, 1, 64, 192)),
    Case("resnet18", {}, (64, 3, 64, 64)),
    Case("resnet18", {}, (32, 3, 224, 224)),
    Case("resnet50", {}, (16, 3, 128, 128)),
    Case("efficientnet_lite0", {}, (32, 3, 224, 224), train=False),
    Case("efficientnet_lite0", {}, (32, 3, 224, 224)),
    Case("convnext_atto", {}, (32, 3, 224, 224)),
    Case("vit_tiny_patch16_224", {}, (32, 3, 224, 224)),
)


def tower_seconds(case: Case, precision: str, trials: int, repeat: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per pass of ``case``'s tower NCHW and NHWC (``repeat`` passes a trial), in alternation."""
    from mmssl.architectures.layout import use_channels_last
    from mmssl.architectures.towers import TimmTower

    torch.manual_seed(0)
    tower = TimmTower(case.arch, case.model_args).to(device, DTYPES[precision]).train(case.train)
    x = torch.randn(case.shape, device=device, dtype=DTYPES[precision])

    def passes() -> None:
        for _ in range(repeat):
            if case.train:
                tower(x).pooled.float().square().mean().backward()
            else:
                with torch.no_grad():
                    tower(x)

    times: dict[str, list[float]] = {"nchw": [], "nhwc": []}
    for _ in range(trials):
        for layout in times:
            use_channels_last(tower, layout == "nhwc")
            times[layout].append(timed(passes, device) / repeat)
            tower.zero_grad(set_to_none=True)
    return {k: v[1:] for k, v in times.items()}


def recipe_with(recipe: str, overrides: Sequence[str], out: Path) -> Path:
    """``recipe`` with ``overrides`` as a YAML file (the trainer's side reads a path)."""
    from mmssl.pretrain.recipe import load_recipe, to_dict

    out.write_text(yaml.safe_dump(to_dict(load_recipe(recipe, list(overrides))), sort_keys=False))
    return out


def step_rates(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Samples/s of the recipe's training step with ``train.channels_last`` false and auto, in alternation."""
    from mmssl.tools.bench.clip_sides import MmsslSide, decoded_batches

    base = [f"train.threads={torch.get_num_threads()}", "train.zero_stage=0", "train.ckpt_every=0",
            "train.tensorboard=false", f"train.precision={args.step_precision}"]
    paths = {name: recipe_with(args.recipe, [*base, *extra], workdir / f"{name}.yaml")
             for name, extra in (("nchw", ["train.channels_last=false"]), ("auto", []))}
    batches = decoded_batches(paths["nchw"], args.steps)
    sides = {name: MmsslSide(path, workdir / f"run-{name}") for name, path in paths.items()}
    rates: dict[str, list[float]] = {name: [] for name in sides}
    samples = sum(len(b) for b in batches)
    for _ in range(args.trials):
        for name, side in sides.items():
            rates[name].append(samples / side.run(batches))
    return {"recipe": args.recipe, "precision": args.step_precision, "steps": args.steps,
            "channels_last_towers": sides["auto"].trainer.channels_last,
            "samples_per_s": {name: statistics.median(r[1:]) for name, r in rates.items()},
            "trials": {name: r[1:] for name, r in rates.items()}}


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    device = bench_device()
    rows = []
    for case in [c for c in CASES if not args.only or c.arch in args.only]:
        for precision in args.precisions:
            t = tower_seconds(case, precision, args.trials, args.repeat, device)
            nchw, nhwc = statistics.median(t["nchw"]), statistics.median(t["nhwc"])
            rows.append({"tower": case.label, "precision": precision, "nchw_ms": 1000 * nchw, "nhwc_ms": 1000 * nhwc,
                         "speedup": nchw / nhwc, "trials": t})
    step = None if args.no_step else step_rates(args, workdir)
    return {"device": device.type, "threads": torch.get_num_threads(), "trials": args.trials,
            "repeat": args.repeat, "towers": rows, "step": step}


def table(result: dict[str, Any]) -> str:
    lines = [f"### Channels-last inputs: tower passes on {result['device']}, {result['threads']} threads, median of "
             f"{result['trials'] - 1} trials", "",
             "| tower | precision | NCHW ms | NHWC ms | NHWC speed-up |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['tower']} | {r['precision']} | {r['nchw_ms']:.1f} | {r['nhwc_ms']:.1f} | {r['speedup']:.2f}x |"
              for r in result["towers"]]
    step = result["step"]
    if step:
        rate = step["samples_per_s"]
        lines += ["", f"### `{step['recipe']}` training step ({step['precision']}, 1 rank, {step['steps']} steps a "
                  "trial, the trainer's feed and DeepSpeed step)", "",
                  "| train.channels_last | towers NHWC | samples/s | ratio |", "|---|---|---:|---:|",
                  f"| false | - | {rate['nchw']:.1f} | 1.00 |",
                  f"| auto (default) | {', '.join(step['channels_last_towers']) or '-'} | {rate['auto']:.1f} "
                  f"| {rate['auto'] / rate['nchw']:.2f} |"]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmssl bench layout", description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=6, help="alternating trials per tower; the first is warm-up")
    p.add_argument("--repeat", type=int, default=3, help="passes per trial")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--recipe", default="quickstart", help="the recipe whose training step part 2 times")
    p.add_argument("--step-precision", default="fp32", choices=list(DTYPES))
    p.add_argument("--steps", type=int, default=4, help="training steps per trial in part 2")
    p.add_argument("--no-step", action="store_true", help="towers only")
    p.add_argument("--only", nargs="+", default=None, metavar="ARCH", help="only these towers' rows")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default=None)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    check_counts(args, ("repeat", "steps", "threads"))
    if not args.no_step:  # a bad --recipe fails here, not after the towers' rows
        from mmssl.pretrain.recipe import load_recipe

        load_recipe(args.recipe)
    known = sorted({c.arch for c in CASES})
    if args.only and set(args.only) - set(known):
        raise ToolError(f"--only {sorted(set(args.only) - set(known))}: not among the towers {known}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from mmssl.tools.bench.open_clip import run_and_report

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return run_and_report(args, run, table)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""``mmssl bench matrix`` / ``mmssl bench scaling``: training throughput of every architecture family x objective
family x ZeRO stage at one model size, and its scaling with batch and ranks.

Every row is a real ``mmssl pretrain`` run (DeepSpeed on ``--nproc`` ranks, the real shard loader over bundled
Fashion-MNIST images + captions; the first step excluded) of a recipe built here, with ``train.profile_comms`` on:

* samples/s, the step-time split per micro-step from ``summary.json`` (data wait, forward, backward, optimizer) and
  DeepSpeed's collectives per step (its comms logger, which makes each collective blocking; they happen inside
  backward and optimizer), peak RSS per rank and the AdamW state bytes per rank;
* model FLOPs per sample: one forward + backward of the same model and objectives on one real batch under
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention), in this process;
* MFU = FLOPs/sample x samples/s / (ranks x the measured peak): the peak is this machine's dense fp32 matmul rate
  (``--peak-size`` square matrices, the threads one rank gets), measured here, not a datasheet figure.

Model (all families): a ViT on 7 x 7 patches of 28 px grey images and a BERT text encoder over 12 tokens, both
``--width`` wide and ``--depth`` deep; late fusion adds a ``--depth``-layer cross-attention fusion, the unified
encoder is ``2 x --depth`` shared layers; the stitched row is the real frozen EfficientNet-Lite0 and a random
2-layer GPT-2 with a Q-Former. ``scaling`` runs the fusion-free contrastive model at global batches 64/128/256 on
``--nproc`` ranks and at one rank.

    mmssl bench matrix [--steps 12] [--nproc 2] [--json out.json] [--only fusion_free ...]
                                        [--stages 0 3]
    mmssl bench scaling [--steps 12]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mmssl.tools.bench.device import bench_device, check_counts
from mmssl.tools.bench.loader import train_run
from mmssl.tools.bench.open_clip import run_and_report
from mmssl.tools.errors import ToolError


@dataclass
class Config:
    family: str
    label: str  # the objectives, as the table prints them
    objectives: dict[str, Any]
    stages: tuple[int, ...] = (2,)
    model: dict[str, Any] = field(default_factory=dict)  # extra model keys (fusion, unified, stitched)
    data: dict[str, Any] = field(default_factory=dict)


def configs(width: int, depth: int) -> list[Config]:
    heads = max(1, width // 32)
    pairs = {"pairs": [["image", "text"]], "exclude_duplicates": "label"}
    fusion = {"fusion": {"kind": "cross_attention", "query": "text", "width": width, "depth": depth, "heads": heads}}
    unified = {"unified": {"width": width, "depth": 2 * depth, "heads": heads, "fusion_depth": 1, "query": "text"}}
    masked = {"mae": {"modality": "image", "decoder_width": 64, "decoder_depth": 1, "decoder_heads": 2},
              "mlm": {"modality": "text"}}
    return [
        Config("fusion_free", "contrastive", {"contrastive": pairs}, stages=(0, 1, 2, 3)),
        Config("fusion_free", "siglip", {"siglip": {"pairs": [["image", "text"]]}}),
        Config("fusion_free", "clustering (XDC)", {"clustering": {"variant": "xdc", "modalities": ["image", "text"],
                                                                  "num_clusters": 10, "refresh_every": 1000,
                                                                  "samples_per_refresh": 256}}),
        Config("fusion_free", "masked (MAE + MLM)", masked),
        Config("fusion_free", "hybrid (contrastive + MAE + MLM)", {"contrastive": pairs, **masked}),
        Config("late_fusion", "contrastive + matching",
               {"contrastive": pairs, "matching": {"query": "text", "context": "image", "negatives": "hard",
                                                   "exclude_duplicates": "label"}}, model=fusion),
        Config("late_fusion", "masked_cross", {"masked_cross": {"modality": "text", "context": "image"}},
               model=fusion),
        Config("late_fusion", "hybrid (ALBEF: momentum ITC + ITM + masked_cross)",
               {"momentum_contrastive": {"pairs": [["image", "text"]], "queue_size": 256},
                "matching": {"query": "text", "context": "image", "negatives": "hard", "exclude_duplicates": "label"},
                "masked_cross": {"modality": "text", "context": "image"}}, stages=(0, 2), model=fusion),
        Config("unified", "contrastive", {"contrastive": pairs}, model=unified, stages=(0, 2, 3)),
        Config("unified", "contrastive + mlm", {"contrastive": pairs, "mlm": {"modality": "text"}}, model=unified),
        Config("stitched", "contrastive + captioning (Q-Former)", {"contrastive": pairs, "captioning": {}},
               model={"stitched": {"bridge": "qformer", "options": {"num_queries": 8, "width": width,
                                                                    "depth": depth, "heads": heads}}}),
    ]


def recipe_for(cfg: Config, stage: int, *, data: Path, spm: Path, weights: dict[str, str], width: int, depth: int,
               batch: int, steps: int) -> dict[str, Any]:
    heads = max(1, width // 32)
    if cfg.family == "stitched":
        towers = {"image": {"arch": "efficientnet_lite0", "pretrained": weights["vision"], "image_size": 64,
                            "in_chans": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                  "text": {"pretrained": weights["lm"], "tokenizer": str(spm), "max_len": 12}}
    else:
        towers = {"image": {"arch": "vit_tiny_patch16_224", "image_size": 28, "patch_size": 7, "in_chans": 1,
                            "width": width, "depth": depth, "heads": heads},
                  "text": {"arch": "bert", "tokenizer": str(spm), "max_len": 12, "width": width, "depth": depth,
                           "heads": heads}}
    return {
        "name": f"bench-{cfg.family}",
        "data": {"train": str(data / "train"), "batch_size": batch, "shuffle_buffer": 4 * batch,
                 "streams_per_rank": 1, "num_workers": 1, "seed": 0, "sampling": "resampled", **cfg.data},
        "model": {"family": cfg.family, "embed_dim": width, **cfg.model, **towers},
        "objectives": cfg.objectives,
        "train": {"steps": steps, "lr": 5e-4, "warmup_steps": 2, "zero_stage": stage, "precision": "fp32",
                  "log_every": steps, "ckpt_every": 0, "tensorboard": False, "profile_comms": True},
    }


def prepare_data(workdir: Path, limit: int) -> tuple[Path, Path, dict[str, str]]:
    """Fashion-MNIST shards, the captions' sentencepiece model, and the stitched row's frozen parts."""
    from mmssl.architectures.stitching.pretrained import efficientnet_lite0_weights, random_causal_lm
    from mmssl.data_pipelines.sources import fashion_mnist
    from mmssl.data_pipelines.tokenizer_training import train_sentencepiece

    data = workdir / "fashion-mnist"
    if not (data / "train").is_dir():
        fashion_mnist.build(data, shard_size=64, limit=limit)
    spm = data / "spm.model"
    if not spm.is_file():
        train_sentencepiece([t.format(c) for c in fashion_mnist.CLASSES for t in fashion_mnist.TEMPLATES], spm,
                            vocab_size=64)
    weights = {"vision": str(efficientnet_lite0_weights(workdir / "weights")),
               "lm": str(random_causal_lm(workdir / "weights" / "tiny-causal-lm", spm))}
    return data, spm, weights


def flops_per_sample(recipe_path: Path) -> float:
    """Forward + backward FLOPs of the recipe's model and objectives on one real batch, per sample."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmssl.architectures.config import build_model
    from mmssl.objectives.registry import build_objectives
    from mmssl.pretrain.data import build_stream
    from mmssl.pretrain.recipe import load_recipe
    from mmssl.pretrain.task import PretrainTask

    recipe = load_recipe(str(recipe_path))
    model = build_model(recipe.model, seed=0)
    objectives, weights = build_objectives(recipe.objectives, model.spec)
    task = PretrainTask(model, objectives, weights).train()
    batch = next(iter(build_stream(recipe, rank=0, world_size=1, start_batch=0)))
    with FlopCounterMode(display=False) as counter:
        task(batch).loss.backward()
    return counter.get_total_flops() / len(batch)


def matmul_peak(threads: int, size: int, repeat: int = 5) -> float:
    """Dense fp32 matmul FLOP/s with ``threads`` threads: the best of ``repeat`` ``size``-square products."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 / best


def row(cfg: Config, stage: int, summary: dict[str, Any], flops: float, peak: float, nproc: int) -> dict[str, Any]:
    split = summary["step_time_split_s"]
    comm = summary.get("communication_s_per_step") or []
    rate = summary["samples_per_s"] or 0.0
    return {
        "family": cfg.family, "objectives": cfg.label, "zero_stage": stage, "ranks": nproc,
        "global_batch": summary["global_batch"], "samples_per_s": rate,
        **{f"{k}_ms": 1000 * v for k, v in split.items()},
        "comm_ms": 1000 * max(c for c in comm if c is not None) if any(c is not None for c in comm) else None,
        "peak_rss_mb_per_rank": summary["peak_rss_mb_per_rank"],
        "optimizer_state_mb_per_rank": [b / 2**20 for b in summary["memory_bytes_per_rank"]["optimizer_state_bytes"]],
        "trainable_parameters": summary["trainable_parameters"],
        "gflop_per_sample": flops / 1e9, "mfu": flops * rate / (nproc * peak) if rate else None,
    }


def table(rows: list[dict[str, Any]], peaks: dict[str, float]) -> str:
    measured = ", ".join(f"{n} rank(s): {v / 1e9:.1f} GFLOP/s per rank" for n, v in sorted(peaks.items()))
    lines = [f"measured fp32 matmul peak ({measured})", "",
             "| family | objectives | ZeRO | ranks | batch | samples/s | data ms | fwd ms | bwd ms | opt ms | comm ms "
             "| peak RSS MB/rank | AdamW state MB/rank | GFLOP/sample | MFU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        def f(key: str, spec: str = ".1f", r: dict[str, Any] = r) -> str:
            return "-" if r.get(key) is None else format(r[key], spec)

        rss = ", ".join(f"{v:.0f}" for v in r["peak_rss_mb_per_rank"])
        lines.append(f"| {r['family']} | {r['objectives']} | {r['zero_stage']} | {r['ranks']} | {r['global_batch']} "
                     f"| {f('samples_per_s')} | {f('data_wait_ms')} | {f('forward_ms')} | {f('backward_ms')} "
                     f"| {f('optimizer_ms')} | {f('comm_ms')} | {rss} "
                     f"| {max(r['optimizer_state_mb_per_rank']):.2f} | {f('gflop_per_sample', '.3f')} "
                     f"| {'-' if r['mfu'] is None else format(100 * r['mfu'], '.1f') + ' %'} |")
    return "\n".join(lines)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    data, spm, weights = prepare_data(workdir, args.limit)
    peaks: dict[int, float] = {}  # ranks -> the peak of one rank's threads (the trainer splits the cores)

    def peak_for(nproc: int) -> float:
        if nproc not in peaks:
            peaks[nproc] = matmul_peak(max(1, (os.cpu_count() or 1) // nproc), args.peak_size)
        return peaks[nproc]

    rows: list[dict[str, Any]] = []
    chosen = [c for c in configs(args.width, args.depth) if not args.only or c.family in args.only]
    plan: list[tuple[Config, int, int, int]] = []  # config, stage, per-rank batch, ranks
    if args.suite == "matrix":
        plan = [(c, s, args.batch, args.nproc) for c in chosen for s in c.stages if not args.stages or s in args.stages]
    else:
        base = chosen[0] if chosen else configs(args.width, args.depth)[0]
        plan = [(base, 2, g // args.nproc, args.nproc) for g in (64, 128, 256)] + [(base, 2, 64, 1)]
    flops: dict[tuple[str, str, int], float] = {}
    for i, (cfg, stage, batch, nproc) in enumerate(plan):
        recipe = recipe_for(cfg, stage, data=data, spm=spm, weights=weights, width=args.width, depth=args.depth,
                            batch=batch, steps=args.steps)
        path = workdir / f"recipe-{i}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        key = (cfg.family, cfg.label, batch)
        if key not in flops:
            flops[key] = flops_per_sample(path)
        summary = train_run(str(path), stage, args.steps, nproc, [], workdir / f"run-{i}")
        rows.append(row(cfg, stage, summary, flops[key], peak_for(nproc), nproc))
        print(f"  {cfg.family:12s} {cfg.label:48s} ZeRO-{stage} x{nproc} batch {summary['global_batch']}: "
              f"{summary['samples_per_s']} samples/s", file=sys.stderr, flush=True)
    return {"suite": args.suite, "config": {k: getattr(args, k) for k in ("width", "depth", "batch", "steps",
                                                                           "nproc", "limit", "peak_size")},
            "matmul_peak_flops_per_rank": {str(n): v for n, v in peaks.items()}, "rows": rows}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmssl bench", description=__doc__.splitlines()[0])
    p.add_argument("suite", choices=["matrix", "scaling"])
    p.add_argument("--steps", type=int, default=12, help="steps per run (the first is excluded)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="per-rank batch of the matrix")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--limit", type=int, default=2048, help="Fashion-MNIST images per split to shard")
    p.add_argument("--peak-size", type=int, default=1024, help="matmul side for the measured peak")
    p.add_argument("--only", nargs="*", default=None, help="families to run (default: all)")
    p.add_argument("--stages", nargs="*", type=int, default=None, help="ZeRO stages to run (default: each row's)")
    p.add_argument("--json", default=None)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    check_counts(args, ("steps", "nproc", "batch", "width", "depth", "limit", "peak_size"), trials=None)
    if args.steps < 2:
        raise ToolError(f"--steps must be >= 2 (the first step is excluded), got {args.steps}")
    if args.width % 32:
        raise ToolError(f"--width must be a multiple of 32 (32-wide heads), got {args.width}")
    bad_stage = sorted(set(args.stages or ()) - {0, 1, 2, 3})
    if bad_stage:
        raise ToolError(f"--stages {bad_stage[0]}: not a ZeRO stage (choose from 0, 1, 2, 3)")
    families = {c.family for c in configs(args.width, args.depth)}
    unknown = sorted(set(args.only or ()) - families)
    if unknown:
        raise ToolError(f"--only {unknown[0]!r}: not a family (choose from {sorted(families)})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench_device()  # DeepSpeed's CPU accelerator only when there is no GPU
    return run_and_report(args, run, lambda result: table(result["rows"], result["matmul_peak_flops_per_rank"]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""``mmssl bench --compare open_clip``: mmssl vs open_clip training the same CLIP model, side by side.

The same dual-encoder CLIP (Radford et al. 2021) is built twice: by open_clip's own factory (``create_model`` on a
model-config dict registered with ``add_model_config``, ``pretrained=None``) and by mmssl (a ``fusion_free`` recipe:
a timm ViT image tower with CLIP's initialisation and CLIP's causal text tower pooled at the end-of-text token, of
the same width / depth / heads / context / vocabulary, linear bias-free projections). Both train on the same real
Fashion-MNIST images and captions (resized to ``--image-size`` px, 3 channels), decoded once by mmssl's shard stream
and then held in memory, so the timed loop is the training step only; both minimise the symmetric InfoNCE

    L = 1/(2N) Σ_i [ -log softmax_j(s·a_i·b_j)[i] - log softmax_j(s·b_i·a_j)[i] ]

with AdamW (same lr, betas, eps, weight decay, no decay on gains / biases), grad-norm clipping 1.0, warmup + cosine.

* open_clip's step is ``open_clip_train.train.train_one_epoch`` itself (its autocast, ``ClipLoss``, clipping and
  logit-scale clamp), over an in-memory loader; ``amp_bf16`` is its bf16 (autocast over fp32 weights).
* mmssl's step is the trainer's: `pretrain.trainer.Trainer` builds model, objectives, `PretrainTask` and the
  DeepSpeed engine (world size 1, ZeRO-0) and each step is the trainer's feed (``data.trim_padding``: each
  batch's text cut to its longest caption, rounded up to 8 tokens; then ``batch.to``) → ``engine(batch)`` → the
  non-finite check (one all-reduce) → ``engine.backward`` → ``engine.step()``, as ``Trainer.fit`` does; its bf16
  is DeepSpeed's (bf16 weights, fp32 master copy).

Per precision, in ONE process, each trial runs ``--steps`` open_clip steps then ``--steps`` mmssl steps; the first
trial is warm-up and excluded; samples/s is the median over the other trials. Peak memory: each framework and
precision in a fresh subprocess (peak RSS: the high-water mark after imports and data decoding, reset there; and
its growth over the RSS at that point, i.e. what the model, optimizer and steps added). A last row times
``Trainer.fit`` end to end on the shards (mmssl's real loader, ``data.num_workers=1``) against the same open_clip
median (pre-decoded).

    mmssl bench --compare open_clip [--steps 5] [--trials 6] [--batch 64] [--json out.json] [--profile]
                                    [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mmssl.tools.bench.clip_sides import (
    PRECISIONS,
    ClipSize,
    MmsslSide,
    OpenClipSide,
    decoded_batches,
    mmssl_fit,
    parameter_counts,
    prepare,
    vocab_size,
)
from mmssl.tools.bench.device import bench_device, check_counts, matmul_peak, peak_memory, reset_peak_memory, step_flops
from mmssl.tools.errors import ToolError

SETTINGS = {  # what each side runs with, printed under the table
    "open_clip": "open_clip_train.train.train_one_epoch; torch AdamW, its CPU default (a loop over parameters); fp32, "
                 "or bf16 autocast over fp32 weights (amp_bf16); + torch.compile: torch.compile(model), its "
                 "--torchcompile",
    "mmssl": "Trainer's step on a DeepSpeed engine, ZeRO-0, 1 rank; defaults: AdamW train.optimizer_impl=fused, "
             "data.trim_padding (each batch's text cut to its longest caption, rounded up to 8), "
             "train.attention_kernel=auto (the math path on the CPU in bf16); fp32, or bf16 weights with fp32 "
             "masters (DeepSpeed bf16); + train.compile: its towers compiled in place",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --- measurement ----------------------------------------------------------------------------------------------
def alternate(sides: Sequence[Any], batches: Sequence[Any], steps: int, trials: int) -> dict[str, list[float]]:
    """Samples/s of each side per trial, sides alternating within a trial, the same batches for all."""
    rates: dict[str, list[float]] = {s.name: [] for s in sides}
    for trial in range(trials):
        chunk = [batches[(trial * steps + i) % len(batches)] for i in range(steps)]
        samples = sum(len(b) for b in chunk)
        for side in sides:
            rates[side.name].append(samples / side.run(chunk))
    return rates


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024.0


def memory_child(framework: str, recipe_path: Path, size: ClipSize, vocab: int, precision: str, batch: int,
                 steps: int, workdir: Path) -> dict[str, float]:
    """Run in a fresh process: RSS after imports and data decoding; then the peak (high-water mark, reset through
    ``/proc/self/clear_refs`` so decoding's transient peak does not count) over build + ``steps`` steps."""
    import open_clip_train.train  # noqa: F401  (both sides pay the same imports)

    import mmssl.pretrain.trainer  # noqa: F401

    device = bench_device()
    batches = decoded_batches(recipe_path, steps)
    base = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    reset_peak_memory(device)
    side = (OpenClipSide(size, vocab, precision, batch, workdir, device) if framework == "open_clip"
            else MmsslSide(recipe_path, workdir / f"mem-{precision}"))
    side.run(batches)
    peak = _status_mb("VmHWM")
    return {"rss_after_imports_mb": round(base, 1), "peak_rss_mb": round(peak, 1),
            "growth_mb": round(peak - base, 1), "peak_device_mb": peak_memory(device)["peak_device_mb"]}


def measure_memory(framework: str, precision: str, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "mmssl.tools.bench.open_clip", "--memory-child", framework, "--precision", precision,
           "--workdir", str(workdir), *_size_argv(args)]
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}  # the parent's process group holds it
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise ToolError(f"memory measurement of {framework} ({precision}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def profile_steps(side: Any, batches: Sequence[Any], top: int = 12) -> str:
    """torch.profiler table of ``side`` over ``batches`` (ops by self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    side.run(batches[:1])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        side.run(batches)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def _size_argv(args: argparse.Namespace) -> list[str]:
    return ["--steps", str(args.steps), "--batch", str(args.batch), "--image-size", str(args.image_size),
            "--patch-size", str(args.patch_size), "--width", str(args.width), "--depth", str(args.depth),
            "--heads", str(args.heads), "--context", str(args.context), "--embed-dim", str(args.embed_dim),
            "--limit", str(args.limit), "--zero-stage", str(args.zero_stage),
            *(["--set", *args.set] if args.set else [])]


# --- report ---------------------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| precision | framework | data | samples/s (median) | ratio mmssl/open_clip | MFU | peak RSS MB "
             "| RSS growth MB | peak device MB | memory ratio |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        def fmt(key: str, spec: str = ".1f", r: dict[str, Any] = r) -> str:
            return format(r[key], spec) if r.get(key) is not None else "-"

        lines.append(f"| {r['precision']} | {r['framework']} | {r['data']} | {fmt('samples_per_s')} | "
                     f"{fmt('ratio', '.2f')} | {fmt('mfu', '.1%')} | {fmt('peak_rss_mb', '.0f')} | "
                     f"{fmt('growth_mb', '.0f')} | {fmt('peak_device_mb', '.0f')} | {fmt('memory_ratio', '.2f')} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmssl bench", description=__doc__.splitlines()[0])
    p.add_argument("--compare", choices=["open_clip"], default="open_clip")
    p.add_argument("--steps", type=int, default=5, help="steps per framework per trial")
    p.add_argument("--trials", type=int, default=6, help="trials (the first is warm-up, excluded)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(PRECISIONS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3], help="mmssl's ZeRO stage (1 rank)")
    p.add_argument("--limit", type=int, default=1024, help="Fashion-MNIST images per split to shard")
    p.add_argument("--json", default=None)
    p.add_argument("--profile", action="store_true", help="print torch.profiler top ops of both steps")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="mmssl recipe overrides, e.g. data.trim_padding=false train.attention_kernel=torch")
    p.add_argument("--best", action="store_true",
                   help="add best-against-best rows: open_clip with torch.compile, mmssl with train.compile=true")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--bare", action="store_true",
                   help="add a row (fp32): mmssl's task stepped by plain torch, no DeepSpeed engine (tools.bench.bare)")
    p.add_argument("--no-real-loader", action="store_true", help="skip the Trainer.fit row on the shards")
    p.add_argument("--workdir", default=None, help="where shards and runs go (default: a temporary directory)")
    for name, default in asdict(ClipSize()).items():
        if name not in ("lr", "weight_decay", "warmup_steps"):
            p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    p.add_argument("--memory-child", choices=["open_clip", "mmssl"], help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_counts(args, ("steps", "batch", "threads", "limit", "width", "depth", "heads"))
    if args.bare and "fp32" not in args.precisions:
        raise ToolError(f"--bare times an fp32 step; --precisions {' '.join(args.precisions)} has no fp32")
    if args.width % args.heads:
        raise ToolError(f"--width {args.width} is not a multiple of --heads {args.heads}")
    if args.image_size % args.patch_size:
        raise ToolError(f"--image-size {args.image_size} is not a multiple of --patch-size {args.patch_size}")
    return args


def _size(args: argparse.Namespace) -> ClipSize:
    return ClipSize(**{k: getattr(args, k) for k in asdict(ClipSize()) if hasattr(args, k)})


def require_open_clip() -> None:
    """The comparison's other side; not a dependency of mmssl itself."""
    try:
        import open_clip  # noqa: F401
        import open_clip_train  # noqa: F401
    except ImportError:
        raise ToolError("mmssl bench --compare open_clip needs open_clip_torch: pip install 'mmssl[bench]'") from None


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    require_open_clip()
    size = _size(args)
    device = bench_device()
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"config": {**asdict(size), "batch": args.batch, "steps": args.steps,
                                         "trials": args.trials, "threads": args.threads, "device": device.type},
                              "rows": rows, "matmul_peak_flops": {}, "settings": SETTINGS}
    pool = None
    for precision in args.precisions:
        recipe = prepare(workdir, size, args.batch, precision, args.limit, args.zero_stage, overrides=args.set)
        vocab = vocab_size(recipe)
        pool = pool or decoded_batches(recipe, min(16, args.steps * args.trials))
        sides = [OpenClipSide(size, vocab, precision, args.batch, workdir, device),
                 MmsslSide(recipe, workdir / precision)]
        if args.bare and precision == "fp32":
            from mmssl.tools.bench.bare import BareTorchSide

            sides.append(BareTorchSide(sides[1]))
        result["parameters"] = parameter_counts(sides[0].model, sides[1].model)
        flops = {s.name: step_flops(lambda s=s, first=pool[:1]: s.run(first)) / len(pool[0]) for s in sides}
        peak = result["matmul_peak_flops"][precision] = matmul_peak(device, DTYPES[precision])
        rates = alternate(sides, pool, args.steps, args.trials)
        median = {name: statistics.median(r[1:]) for name, r in rates.items()}
        memory = {name: measure_memory(name, precision, args, workdir) for name in ("open_clip", "mmssl")} \
            if not args.no_memory else {}
        for name in rates:
            mem = memory.get(name, {})
            rows.append({"precision": precision, "framework": name, "data": "pre-decoded, in memory",
                         "samples_per_s": median[name], "trials": rates[name][1:],
                         "ratio": median[name] / median["open_clip"], "flops_per_sample": flops[name],
                         "mfu": median[name] * flops[name] / peak, **mem,
                         "memory_ratio": (mem["growth_mb"] / memory["open_clip"]["growth_mb"]) if mem else None})
        if args.profile:
            result.setdefault("profile", {})[precision] = {s.name: profile_steps(s, pool[: args.steps]) for s in sides}
        del sides
        if args.best:
            rows.extend(best_rows(args, size, vocab, precision, pool, workdir, flops, peak))
    if args.best:
        result["best"] = best_against_best(rows)
    if not args.no_real_loader:
        recipe = prepare(workdir, size, args.batch, "fp32", args.limit, overrides=args.set)
        summary = mmssl_fit(recipe, workdir / "fit", 1 + args.steps * (args.trials - 1))
        ref = next(r for r in rows if r["framework"] == "open_clip" and r["precision"] == "fp32")
        rows.append({"precision": "fp32", "framework": "mmssl (Trainer.fit)",
                     "data": "shards, ShardStream, 1 worker", "samples_per_s": summary["samples_per_s"],
                     "ratio": summary["samples_per_s"] / ref["samples_per_s"]})
    return result


def best_rows(args: argparse.Namespace, size: ClipSize, vocab: int, precision: str, pool: list[Any],
              workdir: Path, flops: dict[str, float], peak: float) -> list[dict[str, Any]]:
    """Best against best: open_clip compiled as its ``--torchcompile`` does (``torch.compile(model)``) and mmssl with
    ``train.compile=true`` (its towers compiled) on top of its defaults; the first trial (compilation) excluded."""
    recipe = prepare(workdir, size, args.batch, precision, args.limit, args.zero_stage, compile=True,
                     overrides=args.set)
    sides = [OpenClipSide(size, vocab, precision, args.batch, workdir, compile=True),
             MmsslSide(recipe, workdir / f"{precision}-compiled")]
    rates = alternate(sides, pool, args.steps, args.trials)
    median = {name: statistics.median(r[1:]) for name, r in rates.items()}
    ref = median[sides[0].name]
    return [{"precision": precision, "framework": side.name, "data": "pre-decoded, in memory",
             "samples_per_s": median[side.name], "trials": rates[side.name][1:], "ratio": median[side.name] / ref,
             "flops_per_sample": flops[base], "mfu": median[side.name] * flops[base] / peak}
            for side, base in zip(sides, ("open_clip", "mmssl"), strict=True)]


def best_against_best(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per precision, each side's fastest in-memory row (its defaults or compiled) and their ratio."""
    out = []
    for precision in dict.fromkeys(r["precision"] for r in rows):
        best = {}
        for side in ("open_clip", "mmssl"):
            mine = [r for r in rows if r["precision"] == precision and r["framework"].split(" + ")[0] == side
                    and r["data"].startswith("pre-decoded")]
            best[side] = max(mine, key=lambda r: r["samples_per_s"])
        out.append({"precision": precision, "open_clip": best["open_clip"]["framework"],
                    "mmssl": best["mmssl"]["framework"],
                    "ratio": best["mmssl"]["samples_per_s"] / best["open_clip"]["samples_per_s"]})
    return out


def report(result: dict[str, Any]) -> str:
    cfg, params = result["config"], result["parameters"]
    head = (f"### mmssl vs open_clip: CLIP ViT {cfg['width']}w x {cfg['depth']}L patch {cfg['patch_size']} at "
            f"{cfg['image_size']} px + text {cfg['width']}w x {cfg['depth']}L ctx {cfg['context']}; batch "
            f"{cfg['batch']}, {cfg['steps']} steps x {cfg['trials'] - 1} timed trials, {cfg['threads']} threads, "
            f"{cfg.get('device', 'cpu')}\n\n"
            + "".join(f"matmul peak ({p}, measured now): {v / 1e9:.1f} GFLOP/s\n"
                      for p, v in result.get("matmul_peak_flops", {}).items()) +
            f"parameters: open_clip {params['open_clip']:,}, mmssl {params['mmssl']:,} "
            f"({100 * (params['mmssl'] / params['open_clip'] - 1):+.2f} %)\n")
    out = [head, table(result["rows"]), ""]
    out += [f"best against best ({b['precision']}, each side's fastest row): {b['mmssl']} / {b['open_clip']} = "
            f"{b['ratio']:.2f}x" for b in result.get("best", [])]
    out += [f"{name}: {text}" for name, text in result.get("settings", {}).items()]
    for precision, profiles in result.get("profile", {}).items():
        for name, text in profiles.items():
            out.append(f"\n#### profile: {name} ({precision}, ops by self CPU time)\n\n```\n{text}\n```")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bench_device()  # sets DeepSpeed's CPU accelerator when there is no GPU
    if args.memory_child:
        workdir = Path(args.workdir)
        recipe = prepare(workdir, _size(args), args.batch, args.precision, args.limit, args.zero_stage,
                         overrides=args.set)
        print(json.dumps(memory_child(args.memory_child, recipe, _size(args), vocab_size(recipe), args.precision,
                                      args.batch, args.steps, workdir)))
        return 0
    return run_and_report(args, run, report)


def run_and_report(args: argparse.Namespace, run: Callable[[argparse.Namespace, Path], dict[str, Any]],
                   render: Callable[[dict[str, Any]], str]) -> int:
    """A benchmark's common tail: ``run(args, workdir)`` in ``--workdir`` (default: a temporary directory), print
    the machine (`hardware_summary`: the figures depend on it) and ``render(result)``, write the result with its
    ``hardware`` to ``--json`` when given."""
    from mmssl.pretrain.runlog import hardware_summary

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(args, workdir)
    hardware = result["hardware"] = hardware_summary(bench_device().type)
    print(f"machine: {hardware['gpu'] or hardware['cpu']}, {hardware['cpu_count']} CPUs, kernels "
          f"{hardware['cpu_capability']}, torch {hardware['torch']}")
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""``mmssl bench gpu``: the GPU check — everything CPU tests cannot show, in one run on one CUDA device.

1. **Device**: name, compute capability, memory, bf16 support, torch / CUDA / DeepSpeed versions, the bf16 and
   fp32 (TF32) matmul peaks measured now.
2. **Every objective family in bf16**: 3 training steps each of a tiny recipe per family of objectives
   (contrastive: ``clip-tiny``; matching + momentum + MLM hybrid: ``albef-tiny``; masked image / text modelling:
   ``flava-tiny``; autoregressive: ``limber-tiny``; clustering: XDC pseudo-label classification on ``clip-tiny``'s
   towers), each through the real trainer (`pretrain.trainer.Trainer`, ZeRO-2, 1 rank): finite losses, steps/s.
3. **ViT-B/16 CLIP at batch 256, bf16**: ``mmssl bench --compare open_clip`` at the full size (ViT-B/16 at 224 px
   + a 12-layer 512-wide text tower, context 77; mmssl at ZeRO-2), samples/s, MFU against the measured bf16 peak
   and peak device memory, side by side with open_clip's ``train_one_epoch`` on the same GPU, batch and precision.
4. **A real run**: ``mmssl pretrain clip-tiny`` on the shards with the real loader, a checkpoint at step 10,
   stopped there, resumed to 20, exported; the export loads in timm.

Prints one JSON document (and writes it to ``--json``). Without CUDA it says so and exits 0. The shards come from
``--data`` (a directory holding ``fashion-mnist/{train,test}`` and ``spm.model`` as ``mmssl make-shards
fashion-mnist`` writes them; the GPU machines have no Debian data packages) or are built from the installed
Fashion-MNIST package. Budget: under 8 minutes on one H100/H200-class GPU.

    mmssl bench gpu --data DIR [--json docs/gpu-check.json] [--skip clip-b16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmssl.pretrain.rundir import EXPORT, METRICS, SUMMARY
from mmssl.tools.bench.device import matmul_peak
from mmssl.tools.errors import ToolError

FAMILIES = {
    "contrastive": ("clip-tiny", []),
    "hybrid (contrastive + momentum + matching + MLM)": ("albef-tiny", []),
    "masked (MAE + MLM + matching)": ("flava-tiny", []),
    "autoregressive (stitched captioning)": ("limber-tiny", []),
    "clustering (XDC pseudo-labels)": ("clip-tiny", ['objectives={"clustering": {"variant": "xdc", "modalities": '
                                                     '["image", "text"], "num_clusters": 8, "refresh_every": 100, '
                                                     '"samples_per_refresh": 4096, "kmeans_iters": 5}}']),
}
PARTS = ("families", "clip-b16", "pretrain")
CLIP_B16 = ["--image-size", "224", "--patch-size", "16", "--width", "768", "--depth", "12", "--heads", "12",
            "--context", "77", "--embed-dim", "512", "--batch", "256", "--precisions", "bf16", "--steps", "5",
            "--trials", "4", "--zero-stage", "2", "--no-real-loader", "--no-memory"]
CPU_SIZE = ["--width", "64", "--depth", "2", "--heads", "2", "--batch", "16", "--precisions", "bf16", "--steps", "2",
            "--trials", "2", "--zero-stage", "2", "--no-real-loader", "--no-memory", "--limit", "256"]


def clean_env() -> dict[str, str]:
    """This process's environment without the process-group variables its own trainer set, so a child command
    starts its own world instead of joining (and colliding with) this one."""
    own = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in own}


def device_info(device: torch.device) -> dict[str, Any]:
    import deepspeed

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "deepspeed": deepspeed.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gb=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported(),
                    matmul_peak_tflops={"bf16": round(matmul_peak(device, torch.bfloat16) / 1e12, 1),
                                        "fp32 (TF32 allowed)": _tf32_peak(device)})
    else:
        info.update(name=f"CPU ({platform.processor() or platform.machine()}), a dry run of the check",
                    matmul_peak_tflops={"bf16": round(matmul_peak(device, torch.bfloat16) / 1e12, 3)})
    return info


def _tf32_peak(device: torch.device) -> float:
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return round(matmul_peak(device, torch.float32) / 1e12, 1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def data_overrides(data: Path, recipe: str) -> list[str]:
    """``recipe`` pointed at the Fashion-MNIST shards under ``data`` (frozen parts for stitched recipes)."""
    from mmssl.pretrain.recipe import load_recipe

    shards, spm = data / "fashion-mnist", data / "fashion-mnist" / "spm.model"
    loaded = load_recipe(recipe)
    out = [f"model.text.tokenizer={spm}"]
    if loaded.data.sources:
        sources = [{"name": s.name, "train": str(shards / "train"), "weight": s.weight, "modalities": s.modalities}
                   for s in loaded.data.sources]
        out.append(f"data.sources={json.dumps(sources)}")
    else:
        out.append(f"data.train={shards / 'train'}")
    if loaded.model.family == "stitched":
        out += [f"model.image.pretrained={data / 'weights' / 'efficientnet_lite0.safetensors'}",
                f"model.text.pretrained={data / 'weights' / 'tiny-causal-lm'}"]
    return out


def families(data: Path, workdir: Path) -> dict[str, Any]:
    """3 bf16 steps of each objective family through the trainer (1 rank, ZeRO-2)."""
    from mmssl.pretrain.recipe import load_recipe
    from mmssl.pretrain.trainer import Trainer

    out = {}
    for family, (recipe, extra) in FAMILIES.items():
        overrides = [*data_overrides(data, recipe), *extra, "train.precision=bf16", "train.zero_stage=2",
                     "train.steps=3", "train.log_every=1", "train.ckpt_every=0", "train.tensorboard=false"]
        run_dir = workdir / f"family-{recipe}-{len(out)}"
        t0 = time.perf_counter()
        summary = Trainer(load_recipe(recipe, overrides), run_dir).fit()
        losses = [json.loads(line)["loss"] for line in (run_dir / METRICS).read_text().splitlines()]
        out[family] = {"recipe": recipe, "losses": losses, "finite": all(math.isfinite(v) for v in losses),
                       "seconds": round(time.perf_counter() - t0, 1),
                       "peak_device_memory_mb": summary["peak_device_memory_mb"]}
    return out


def clip_b16(data: Path, workdir: Path, size: list[str]) -> dict[str, Any]:
    """``mmssl bench --compare open_clip`` at ``size`` (`CLIP_B16`: ViT-B/16, batch 256, bf16), in a subprocess
    (its own process group)."""
    out_json = workdir / "clip-b16.json"
    (workdir / "b16").mkdir(parents=True, exist_ok=True)
    shards = data / "fashion-mnist"
    if (shards / "train").is_dir() and not (workdir / "b16" / "fashion-mnist").exists():
        (workdir / "b16" / "fashion-mnist").symlink_to(shards.resolve())
    cmd = [sys.executable, "-m", "mmssl", "bench", "--compare", "open_clip", *size, "--workdir",
           str(workdir / "b16"), "--json", str(out_json)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env())
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    result = json.loads(out_json.read_text())
    return {"rows": [{k: r.get(k) for k in ("framework", "samples_per_s", "ratio", "mfu", "flops_per_sample")}
                     for r in result["rows"]], "parameters": result["parameters"],
            "matmul_peak_flops": result["matmul_peak_flops"], "table": proc.stdout[-4000:]}


def pretrain_run(data: Path, workdir: Path) -> dict[str, Any]:
    """``mmssl pretrain clip-tiny`` (real loader, bf16): stop at 10 with a checkpoint, resume to 20, export."""
    run_dir = workdir / "pretrain"
    base = [sys.executable, "-m", "mmssl", "pretrain", "clip-tiny", "--nproc", "1", "--run-dir", str(run_dir),
            *data_overrides(data, "clip-tiny"), "train.precision=bf16", "train.steps=20", "train.ckpt_every=10",
            "train.log_every=5", "train.tensorboard=false"]
    steps = []
    for extra in (["--overwrite", "train.stop_at=10"], ["train.resume=latest"]):
        t0 = time.perf_counter()
        proc = subprocess.run([*base, *extra], capture_output=True, text=True, env=clean_env())
        steps.append({"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
                      "stderr_tail": proc.stderr[-1500:] if proc.returncode else None})
    export = subprocess.run([sys.executable, "-m", "mmssl", "export", str(run_dir), "--out",
                             str(run_dir / EXPORT)], capture_output=True, text=True, env=clean_env())
    summary = json.loads((run_dir / SUMMARY).read_text()) if (run_dir / SUMMARY).exists() else {}
    loads = None
    if export.returncode == 0:
        import timm

        cfg = json.loads((run_dir / EXPORT / "image" / "config.json").read_text())
        model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0, **cfg.get("model_args", {}),
                                  pretrained_cfg_overlay={"file": str(run_dir / EXPORT / "image" /
                                                                      "model.safetensors")})
        loads = sum(p.numel() for p in model.parameters())
    return {"runs": steps, "export_rc": export.returncode, "timm_parameters": loads,
            "steps": summary.get("steps"), "samples_per_s": summary.get("samples_per_s"),
            "final_loss": summary.get("final_loss"), "peak_device_memory_mb": summary.get("peak_device_memory_mb"),
            "ok": all(s["rc"] == 0 for s in steps) and export.returncode == 0 and summary.get("steps") == 20}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmssl bench gpu", description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="directory with fashion-mnist/{train,test,spm.model} and weights/")
    p.add_argument("--json", default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--skip", nargs="*", default=[], choices=list(PARTS))
    p.add_argument("--cpu", action="store_true", help="without a GPU, run every part on the CPU at a small size "
                   "(checks the check itself; its figures mean nothing)")
    return p.parse_args(argv)


def prepare_data(data: Path) -> None:
    """Build what is missing under ``data`` from the installed packages (not possible on the GPU machines)."""
    from mmssl.architectures.stitching.pretrained import efficientnet_lite0_weights, random_causal_lm
    from mmssl.data_pipelines.sources import fashion_mnist

    shards = data / "fashion-mnist"
    if not (shards / "train").is_dir():
        fashion_mnist.build(shards, limit=2000, shard_size=250)
    if not (shards / "spm.model").is_file():
        from mmssl.data_pipelines.tokenizer_training import train_sentencepiece

        train_sentencepiece([t.format(c) for c in fashion_mnist.CLASSES for t in fashion_mnist.TEMPLATES],
                            shards / "spm.model", vocab_size=64)
    weights = data / "weights"
    if not (weights / "efficientnet_lite0.safetensors").is_file():
        efficientnet_lite0_weights(weights)
    if not (weights / "tiny-causal-lm").is_dir():
        random_causal_lm(weights / "tiny-causal-lm", shards / "spm.model")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        print("mmssl bench gpu: no CUDA device here (torch.cuda.is_available() is False); the GPU check needs one. "
              "Nothing was run.")
        return 0
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    size = CLIP_B16 if cuda else CPU_SIZE
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        data = Path(args.data) if args.data else workdir / "data"
        try:
            prepare_data(data)
        except Exception as exc:  # the data packages are missing: say what to pass
            raise ToolError(f"mmssl bench gpu: no shards under {data} and none can be built here ({exc}); pass --data "
                             "DIR holding fashion-mnist/ (`mmssl make-shards fashion-mnist --out DIR/fashion-mnist`) "
                             "and weights/ (`mmssl weights efficientnet-lite0` and `random-causal-lm`)") from None
        t0 = time.perf_counter()
        result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "device": device_info(device)}
        if "families" not in args.skip:
            result["families_bf16"] = families(data, workdir)
        if "clip-b16" not in args.skip:
            result["clip_b16_bf16_batch256" if cuda else "clip_small_bf16"] = clip_b16(data, workdir, size)
        if "pretrain" not in args.skip:
            result["pretrain_resume_export"] = pretrain_run(data, workdir)
        result["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

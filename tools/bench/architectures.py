"""Benchmark of the architecture families: forward+backward samples/s, peak memory and parameter counts per family
at one fixed size, every model built through the recipe path (`architectures.config.build_model`).

    mmssl bench architectures [--batch 16] [--repeat 5] [--device cpu|cuda] [--threads N] [--json out.json]
        [--only fusion_free late_cross_attention ...]

Families measured (audio ViT + text BERT towers of width 64, depth 2, unless stitched):

* ``fusion_free`` (the reference row: ImageBind-style separate towers, Girdhar et al., 2023),
* ``late_fusion`` with ``model.fusion.kind`` in cross_attention, mult (MulT, Tsai et al., 2019), tensor (TFN,
  Zadeh et al., 2017), low_rank (LMF, Liu et al., 2018), gated, concat,
* ``unified`` (one shared transformer), with modality experts (VLMo, Bao et al., 2022) and with 16 Perceiver
  latents (Jaegle et al., 2021),
* ``stitched``: frozen EfficientNet-Lite0 + frozen all-MiniLM-L6-v2 joined by a trainable Q-Former (BLIP-2, Li et
  al., 2023) or a linear bridge.

The timed step is ``loss = Σ_m ||embeddings[m]||² + Σ_q mean(fused[q])`` then ``loss.backward()`` (no optimizer):
it backpropagates through everything forward produced. Time is the median over ``--repeat`` iterations after one
warm-up; peak memory is measured on one further iteration under `tools.bench.memory.PeakMemory` (CUDA allocator counters
on a GPU; tracked tensor storages on CPU, whose dispatch hook would distort the timing, hence the separate
iteration). Ratios are against the ``fusion_free`` row measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmssl.architectures.config import FusionConfig, ModelConfig, StitchConfig, UnifiedConfig, build_model
from mmssl.architectures.modalities import AudioConfig, ImageConfig, TextConfig, get_modality
from mmssl.architectures.outputs import ModelOutput
from mmssl.tools.bench.memory import PeakMemory

REFERENCE = "fusion_free"
WIDTH, DEPTH, HEADS = 64, 2, 2
SENTENCES = [
    "please enter your password followed by the pound key", "thank you for calling goodbye",
    "press one for sales or two for support", "the number you have dialed is not in service",
    "you have no new messages", "please hold while we connect your call", "the conference is now full",
    "your call is important to us", "to leave a message press the star key", "main menu press zero",
]


@dataclass
class BenchAssets:
    """Files the configs point at, created lazily in ``root``: a sentencepiece model for the text tower, the
    converted EfficientNet-Lite0 weights and the all-MiniLM-L6-v2 directory for the stitched family."""

    root: Path
    _spm: Path | None = None
    _effnet: Path | None = None

    def spm(self) -> Path:
        if self._spm is None:
            from mmssl.data_pipelines.tokenizer_training import train_sentencepiece

            self._spm = train_sentencepiece(SENTENCES * 6, self.root / "spm.model", vocab_size=100)
        return self._spm

    def effnet(self) -> Path:
        if self._effnet is None:
            from mmssl.architectures.stitching.pretrained import efficientnet_lite0_weights

            self._effnet = efficientnet_lite0_weights(self.root)
        return self._effnet


def _two_towers(family: str, assets: BenchAssets) -> ModelConfig:
    audio = AudioConfig(width=WIDTH, depth=DEPTH, heads=HEADS, n_mels=32, frames=64, patch_size=[16, 16])
    text = TextConfig(tokenizer=str(assets.spm()), width=WIDTH, depth=DEPTH, heads=HEADS, max_len=12)
    return ModelConfig(family=family, embed_dim=WIDTH, towers={"audio": audio, "text": text})


def _late(kind: str, **options: Any) -> Callable[[BenchAssets], ModelConfig]:
    def make(assets: BenchAssets) -> ModelConfig:
        cfg = _two_towers("late_fusion", assets)
        cfg.fusion = FusionConfig(kind=kind, query="text", width=WIDTH, depth=DEPTH, heads=HEADS, options=options)
        return cfg

    return make


def _unified(**fields: Any) -> Callable[[BenchAssets], ModelConfig]:
    def make(assets: BenchAssets) -> ModelConfig:
        cfg = _two_towers("unified", assets)
        cfg.unified = UnifiedConfig(width=WIDTH, depth=DEPTH, heads=HEADS, fusion_depth=1, query="text", **fields)
        return cfg

    return make


def _stitched(bridge: str, **options: Any) -> Callable[[BenchAssets], ModelConfig]:
    def make(assets: BenchAssets) -> ModelConfig:
        from mmssl.architectures.stitching.pretrained import minilm_dir

        minilm = minilm_dir()
        image = ImageConfig(arch="efficientnet_lite0", pretrained=str(assets.effnet()), image_size=64, in_chans=3)
        text = TextConfig(pretrained=str(minilm), tokenizer=str(minilm / "tokenizer.json"), max_len=16)
        return ModelConfig(family="stitched", embed_dim=WIDTH, towers={"image": image, "text": text},
                           stitched=StitchConfig(bridge=bridge, options=options))

    return make


CASES: dict[str, Callable[[BenchAssets], ModelConfig]] = {
    REFERENCE: lambda assets: _two_towers("fusion_free", assets),
    "late_cross_attention": _late("cross_attention"),
    "late_mult": _late("mult"),
    "late_tensor": _late("tensor", factor_dim=8),
    "late_low_rank": _late("low_rank"),
    "late_gated": _late("gated"),
    "late_concat": _late("concat"),
    "unified": _unified(),
    "unified_experts": _unified(experts=True),
    "unified_latents16": _unified(latents=16),
    "stitched_qformer": _stitched("qformer", num_queries=8, width=WIDTH, depth=1, heads=2),
    "stitched_linear": _stitched("linear"),
}


def step_loss(out: ModelOutput) -> torch.Tensor:
    """``Σ_m ||embeddings[m]||² + Σ_q mean(fused[q])``: a scalar that depends on everything forward produced."""
    loss = sum(e.pow(2).sum() for e in out.embeddings.values())
    return loss + sum(f.mean() for f in out.fused.values())  # type: ignore[return-value]


def _to(x: Any, device: torch.device) -> Any:
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(name: str, cfg: ModelConfig, batch: int, repeat: int, device: torch.device) -> dict[str, Any]:
    """One row: median forward+backward time over ``repeat`` iterations (after one warm-up), peak memory of one
    further iteration, parameter counts."""
    model = build_model(cfg, seed=0).to(device).train()
    torch.manual_seed(0)
    inputs = {m: _to(get_modality(m).random_example(tower_cfg, batch), device) for m, tower_cfg in cfg.towers.items()}

    def step() -> None:
        model.zero_grad(set_to_none=True)
        step_loss(model(inputs)).backward()

    times = []
    for i in range(repeat + 1):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        if i:  # the first call allocates and warms up
            times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    with PeakMemory(device) as mem:
        step_loss(model(inputs)).backward()
    seconds = statistics.median(times)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"architecture": name, "family": cfg.family, "ms": 1000 * seconds, "samples_per_s": batch / seconds,
            "peak_mb": mem.peak_mb, "parameters": total, "trainable_parameters": trainable}


def architecture_rows(names: Sequence[str] | None = None, *, batch: int = 16, repeat: int = 5,
                      device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """Rows for the ``names`` of `CASES` (all by default); the reference ``fusion_free`` row is always measured
    first, and every row gets ``time_vs_fusion_free`` / ``memory_vs_fusion_free`` (ratios of ms and peak MB)."""
    device = torch.device(device)
    names = list(CASES) if names is None else list(names)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown architecture {unknown[0]!r}; choose from {list(CASES)}")
    ordered = [REFERENCE] + [n for n in names if n != REFERENCE]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        assets = BenchAssets(Path(tmp))
        for name in ordered:
            rows.append(bench_one(name, CASES[name](assets), batch, repeat, device))
    ref = rows[0]
    for r in rows:
        r["time_vs_fusion_free"] = r["ms"] / ref["ms"]
        r["memory_vs_fusion_free"] = r["peak_mb"] / ref["peak_mb"]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'architecture':<22}{'samples/s':>11}{'time/ref':>10}{'peak MB':>10}{'mem/ref':>9}"
             f"{'params':>12}{'trainable':>12}"]
    for r in rows:
        lines.append(f"{r['architecture']:<22}{r['samples_per_s']:>11.1f}{r['time_vs_fusion_free']:>9.2f}x"
                     f"{r['peak_mb']:>10.1f}{r['memory_vs_fusion_free']:>8.2f}x"
                     f"{r['parameters']:>12,}{r['trainable_parameters']:>12,}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--only", nargs="+", default=None, choices=list(CASES), help="architectures to measure")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeat < 1:
        parser.error(f"--batch and --repeat must be >= 1, got {args.batch} and {args.repeat}")
    device = torch.device("cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    rows = architecture_rows(args.only, batch=args.batch, repeat=args.repeat, device=device)
    print(f"\narchitectures: forward + backward, batch {args.batch}, {device.type}, {torch.get_num_threads()} "
          f"threads, median of {args.repeat}; ratios are time and peak memory vs {REFERENCE}")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Benchmark of the objective library: forward+backward time and peak memory per objective on one fixed batch,
and the contrastive loss's memory as the batch grows on 2 real ranks.

    mmssl bench objectives [--batch 32] [--repeat 5] [--sizes 256 512 1024] [--json out.json]

Part 1 builds one late-fusion model (timm ViT on spectrograms + BERT text tower + cross-attention fusion, small
but real) and times ``model forward + objective + backward`` for each registered objective kind on the same random
batch, with ratios against the plain contrastive objective measured in the same process. Peak memory is the
additional tensor memory of that region (`tools.bench.memory.PeakMemory`: CUDA's allocator counters on a GPU, tracked
tensor storages on CPU).

Part 2 runs the contrastive loss alone on 2 gloo ranks with ``B_local`` rows per rank and reports each rank's
peak memory next to ``B_local·B_global``: the local-rows form grows with their product (not ``B_global²``, what
every rank would hold if it built the whole similarity matrix, open_clip's ``local_loss=False``), shown by the
last columns.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from mmssl.tools.bench.memory import PeakMemory

SENTENCES = [
    "please enter your password followed by the pound key", "thank you for calling goodbye",
    "press one for sales or two for support", "the number you have dialed is not in service",
    "you have no new messages", "please hold while we connect your call", "the conference is now full",
    "your call is important to us", "to leave a message press the star key", "main menu press zero",
]

# One configuration per objective kind, sized for the bench model (audio ViT + text BERT + fusion on text).
GALLERY: dict[str, dict[str, Any]] = {
    "contrastive": {"pairs": [["audio", "text"]]},
    "siglip": {"pairs": [["audio", "text"]]},
    "intramodal": {"modalities": ["audio"]},
    "matching": {"query": "text", "context": "audio"},
    "momentum_contrastive": {"pairs": [["audio", "text"]], "queue_size": 1024},
    "clustering": {"variant": "xdc", "modalities": ["audio", "text"], "num_clusters": 8,
                   "samples_per_refresh": 32},
    "swav": {"modalities": ["audio", "text"], "num_prototypes": 64},
    "mlm": {"modality": "text"},
    "masked_cross": {"modality": "text", "context": "audio"},
    "mae": {"modality": "audio"},
    "masked_cluster": {"modality": "audio"},
    "prefix_lm": {"context": "audio", "target": "text"},
    "factorcl": {"modalities": ["audio", "text"], "variant": "supervised", "label": "family"},
}


def bench_recipe(tmp: Path, batch: int) -> Any:
    from mmssl.data_pipelines.tokenizer_training import train_sentencepiece
    from mmssl.pretrain.recipe import load_recipe

    spm = train_sentencepiece(SENTENCES * 4, tmp / "spm.model", vocab_size=120)
    raw = {
        "name": "bench-objectives",
        "data": {"train": str(tmp), "batch_size": batch, "views": {"audio": 2}},
        "model": {
            "family": "late_fusion", "embed_dim": 128,
            "fusion": {"query": "text", "width": 128, "depth": 2, "heads": 4},
            "audio": {"arch": "vit_tiny_patch16_224", "width": 128, "depth": 2, "heads": 4, "frames": 128,
                      "n_mels": 64, "patch_size": [16, 16]},
            "text": {"tokenizer": str(spm), "width": 128, "depth": 2, "heads": 4, "max_len": 24},
        },
        "objectives": {"contrastive": GALLERY["contrastive"]},
    }
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_recipe(path)


def random_batch(recipe: Any, batch: int) -> Any:
    from mmssl.architectures.modalities import get_modality
    from mmssl.data_pipelines.batch import Batch

    torch.manual_seed(0)
    inputs = {m: get_modality(m).random_example(cfg, batch) for m, cfg in recipe.model.towers.items()}
    inputs["audio@1"] = inputs["audio"] + 0.1 * torch.randn_like(inputs["audio"])
    present = {m: torch.ones(batch, dtype=torch.bool) for m in inputs}
    keys = [f"sample{i:05d}" for i in range(batch)]
    meta = {"text": [SENTENCES[i % len(SENTENCES)] for i in range(batch)],
            "family": [f"family{i % 5}" for i in range(batch)]}
    return Batch(inputs=inputs, present=present, keys=keys, meta=meta)


def objective_table(batch_size: int, repeat: int, device: torch.device) -> list[dict[str, Any]]:
    from mmssl.architectures.config import build_model
    from mmssl.objectives.base import base_modality
    from mmssl.objectives.registry import OBJECTIVES, ObjectivesConfig, build_objectives
    from mmssl.pretrain.recipe import RecipeError, convert
    from mmssl.pretrain.task import PretrainTask

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        recipe = bench_recipe(Path(tmp), batch_size)
        full_batch = random_batch(recipe, batch_size).to(device)
        for kind, cfg in GALLERY.items():
            if kind not in OBJECTIVES:
                continue
            model = build_model(recipe.model, seed=0).to(device)
            try:
                terms = convert(ObjectivesConfig, {kind: cfg}, path=("objectives",), origin=_Origin())
            except RecipeError as exc:
                rows.append({"objective": kind, "error": str(exc)})
                continue
            objectives, weights = build_objectives(terms, model.spec)
            task = PretrainTask(model, objectives, weights).to(device)
            needed = {m for o in objectives.values() for m in o.requires.modalities}
            batch = full_batch.only([m for m in full_batch.inputs if base_modality(m) == m or m in needed])
            for objective in objectives.values():  # pseudo-label services label the bench batch first
                if objective.refresh_every:
                    objective.refresh(0, _single_batch(model, batch))
            times, peaks = [], []
            for i in range(repeat + 1):
                task.zero_grad(set_to_none=True)
                _sync(device)
                t0 = time.perf_counter()
                with PeakMemory(device) as mem:
                    out = task(batch)
                    out.loss.backward()
                _sync(device)
                if i:  # the first call allocates and warms up
                    times.append(time.perf_counter() - t0)
                    peaks.append(mem.peak_mb)
            rows.append({"objective": kind, "ms": 1000 * statistics.median(times), "peak_mb": max(peaks)})
    ref = next((r for r in rows if r["objective"] == "contrastive"), None)
    for r in rows:
        if ref and "ms" in r:
            r["time_vs_contrastive"] = r["ms"] / ref["ms"]
            r["memory_vs_contrastive"] = r["peak_mb"] / ref["peak_mb"]
    return rows


def _single_batch(model: Any, batch: Any) -> Any:
    def features() -> Any:
        with torch.no_grad():
            yield batch.keys, model(batch.inputs, batch.present)

    return features


class _Origin:
    def of(self, path: tuple[str, ...]) -> str:
        return "bench_objectives.GALLERY"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _full_matrix_loss(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The form that builds the whole ``B_global x B_global`` similarity matrix on every rank (for comparison)."""
    import torch.nn.functional as F

    from mmssl.objectives.distributed import gather_with_grad

    a_all, b_all = gather_with_grad(F.normalize(a, dim=-1)), gather_with_grad(F.normalize(b, dim=-1))
    logits = scale * a_all @ b_all.T
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _contrastive_rank(rank: int, world: int, sizes: list[int], dim: int) -> dict[str, dict[int, float]]:
    from mmssl.objectives.contrastive import contrastive_loss

    peaks: dict[str, dict[int, float]] = {"local": {}, "full": {}}
    for b in sizes:
        for form in ("local", "full"):
            g = torch.Generator().manual_seed(rank)
            a = torch.randn(b, dim, generator=g, requires_grad=True)
            t = torch.randn(b, dim, generator=g, requires_grad=True)
            with PeakMemory() as mem:
                loss = contrastive_loss(a, t, 10.0)[0] if form == "local" else _full_matrix_loss(a, t, 10.0)
                loss.backward()
            peaks[form][b] = mem.peak_mb
    return peaks


def scaling_table(sizes: list[int], dim: int = 256) -> list[dict[str, Any]]:
    from tests.helpers.spawn import spawn_ranks

    per_rank = spawn_ranks(_contrastive_rank, sizes, dim, world=2)
    rows = []
    for b in sizes:
        local = max(r["local"][b] for r in per_rank)
        full = max(r["full"][b] for r in per_rank)
        rows.append({"b_local": b, "b_global": 2 * b, "peak_mb_per_rank": local,
                     "bytes_per_local_x_global": local * 2**20 / (b * 2 * b), "full_matrix_peak_mb": full,
                     "full_vs_local": full / local})
    for prev, row in itertools.pairwise(rows):
        row["growth"] = row["peak_mb_per_rank"] / prev["peak_mb_per_rank"]
        row["growth_of_local_x_global"] = (row["b_local"] * row["b_global"]) / (prev["b_local"] * prev["b_global"])
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmssl bench objectives", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    objectives = objective_table(args.batch, args.repeat, device)
    scaling = scaling_table(args.sizes)

    print(f"\nobjectives: model forward + objective + backward, batch {args.batch}, {device.type}, median of "
          f"{args.repeat}")
    print(f"{'objective':<22}{'ms':>10}{'vs contrastive':>16}{'peak MB':>10}{'vs contrastive':>16}")
    for r in objectives:
        if "error" in r:
            print(f"{r['objective']:<22}  error: {r['error']}")
            continue
        print(f"{r['objective']:<22}{r['ms']:>10.1f}{r.get('time_vs_contrastive', float('nan')):>15.2f}x"
              f"{r['peak_mb']:>10.1f}{r.get('memory_vs_contrastive', float('nan')):>15.2f}x")
    print("\ncontrastive loss alone on 2 gloo ranks (embedding dim 256): local rows x gathered columns")
    print(f"{'B_local':>8}{'B_global':>9}{'peak MB/rank':>14}{'growth':>8}{'B_l*B_g growth':>16}"
          f"{'bytes/(B_l*B_g)':>17}{'full-matrix MB':>16}{'full/local':>12}")
    for r in scaling:
        growth = f"{r['growth']:.2f}x" if "growth" in r else "-"
        product = f"{r['growth_of_local_x_global']:.0f}x" if "growth" in r else "-"
        print(f"{r['b_local']:>8}{r['b_global']:>9}{r['peak_mb_per_rank']:>14.2f}{growth:>8}{product:>16}"
              f"{r['bytes_per_local_x_global']:>17.1f}{r['full_matrix_peak_mb']:>16.2f}{r['full_vs_local']:>11.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"objectives": objectives, "scaling": scaling}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""FLAVA-style mixed training: one run over a paired image-caption source, an image-only source and a text-only
source (real Fashion-MNIST images and captions), with image-text contrastive + MAE on images + MLM on captions.

* each objective sees only the rows that have its modalities: its loss on a mixed batch equals its loss on the
  sub-batch of exactly those rows (masks are seeded per sample key, so they do not depend on the batch around);
* a 2-rank DeepSpeed run (`mmssl pretrain`) trains every loss term down, and the rows it drew from each source
  match the weights: each count within 4 standard deviations of the multinomial mean ``n·w_s/Σw`` (n = 960
  rows, so within about ±9 % of a 0.25 share).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mmssl.architectures.config import build_model
from mmssl.data_pipelines.batch import Batch
from mmssl.data_pipelines.shards import resolve_shards
from mmssl.data_pipelines.tokenizer_training import train_sentencepiece
from mmssl.objectives.registry import build_objectives
from mmssl.pretrain.data import build_stream
from mmssl.pretrain.recipe import load_recipe
from tests.conftest import mmssl

WEIGHTS = {"pairs": 0.5, "images": 0.25, "captions": 0.25}


@pytest.fixture(scope="module")
def mixed_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmssl.data_pipelines.sources import fashion_mnist

    out = tmp_path_factory.mktemp("mixed")
    fashion_mnist.build(out, limit=240, shard_size=10)
    urls = resolve_shards(str(out / "train"))
    spm = train_sentencepiece(_captions(urls), out / "spm.model", vocab_size=60)
    recipe = {
        "name": "mixed",
        "data": {"sources": [
            {"name": "pairs", "train": "", "weight": WEIGHTS["pairs"]},
            {"name": "images", "train": "", "weight": WEIGHTS["images"], "modalities": ["image"]},
            {"name": "captions", "train": "", "weight": WEIGHTS["captions"], "modalities": ["text"]}],
            "batch_size": 16, "shuffle_buffer": 32, "streams_per_rank": 2, "num_workers": 1, "seed": 0},
        "model": {
            "embed_dim": 32,
            "image": {"arch": "vit_tiny_patch16_224", "image_size": 28, "patch_size": 4, "in_chans": 1,
                      "width": 48, "depth": 2, "heads": 2},
            "text": {"tokenizer": str(spm), "width": 48, "depth": 1, "heads": 2, "max_len": 12},
        },
        "objectives": {
            "contrastive": {"pairs": [["image", "text"]]},
            "mae": {"modality": "image", "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2},
            "mlm": {"modality": "text"},
        },
        "train": {"steps": 30, "lr": 2e-3, "warmup_steps": 3, "log_every": 10, "zero_stage": 2,
                  "precision": "fp32", "tensorboard": False, "threads": 1},
    }
    # three disjoint shard sets of the same real data: 12 paired shards, 6 image-only, 6 caption-only
    for source, part in zip(recipe["data"]["sources"], (urls[:12], urls[12:18], urls[18:]), strict=True):
        source["train"] = _brace(part)
    path = out / "mixed.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _brace(urls: list[str]) -> str:
    first, last = Path(urls[0]), Path(urls[-1])
    return str(first.parent / f"shard-{{{first.stem.split('-')[1]}..{last.stem.split('-')[1]}}}.tar")


def _captions(urls: list[str]) -> list[str]:
    from mmssl.data_pipelines.reader import ShardReader

    reader = ShardReader(where="test")
    return [s["txt"].decode() for u in urls for _, s in reader.samples(u)]


def _rows(batch: Batch, keep: torch.Tensor) -> Batch:
    idx = keep.nonzero().squeeze(1)

    def pick(v: Any) -> Any:
        return {k: t[idx] for k, t in v.items()} if isinstance(v, dict) else v[idx]

    return Batch(inputs={m: pick(v) for m, v in batch.inputs.items()},
                 present={m: p[idx] for m, p in batch.present.items()},
                 keys=[batch.keys[i] for i in idx.tolist()], index=batch.index)


def test_each_objective_sees_only_the_rows_with_its_modalities(mixed_recipe: Path) -> None:
    recipe = load_recipe(str(mixed_recipe))
    model = build_model(recipe.model, seed=0).eval()
    objectives, _ = build_objectives(recipe.objectives, model.spec)
    for objective in objectives.values():
        objective.bind(model)
    stream = build_stream(recipe, rank=0, world_size=1, start_batch=0)
    batch = next(iter(stream))
    image, text = batch.present["image"], batch.present["text"]
    assert image.any() and text.any() and (image & text).any() and (image ^ text).any()  # really mixed
    needs = {"contrastive": image & text, "mae": image, "mlm": text}
    with torch.no_grad():
        outputs = model(batch.inputs, batch.present)
        for name, rows in needs.items():
            sub = _rows(batch, rows)
            mixed = objectives[name](outputs, batch, model).loss
            alone = objectives[name](model(sub.inputs, sub.present), sub, model).loss
            assert torch.allclose(mixed, alone, rtol=1e-5, atol=1e-6), (name, float(mixed), float(alone))


@pytest.mark.distributed
def test_mixed_paired_and_unpaired_sources_train_every_term_at_their_weights(mixed_recipe: Path,
                                                                             tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = mmssl("pretrain", str(mixed_recipe), "--nproc", "2", "--run-dir", str(run), timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    rows = summary["rows_per_source"]
    n = 30 * 16 * 2
    assert sum(rows.values()) == n
    for name, weight in WEIGHTS.items():
        assert abs(rows[name] - n * weight) <= 4 * math.sqrt(n * weight * (1 - weight)), rows
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for term in ("loss/contrastive", "loss/mae", "loss/mlm"):
        first = sum(r[term] for r in records[:5]) / 5
        last = sum(r[term] for r in records[-5:]) / 5
        assert last < first, (term, first, last)

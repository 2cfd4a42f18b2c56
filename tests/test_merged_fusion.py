"""Merged-attention fusion (FLAVA's multimodal encoder, CAV-MAE's joint layer) and the joint MAE objective.

The fusion against torch's own ``nn.TransformerEncoderLayer`` (pre-norm, GELU) with the same weights; rows are
independent and an absent modality counts as not given; joint_mae's loss against the per-modality MSE written out in
float64 over exactly the masked patches of present rows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mmssl.architectures.merged import MergedAttentionFusion

DIMS = {"audio": 12, "image": 10}


def _tokens(b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"audio": torch.randn(b, 5, 12, generator=g), "image": torch.randn(b, 4, 10, generator=g)}


def test_merged_fusion_equals_torch_transformer_encoder_layer() -> None:
    torch.manual_seed(0)
    fusion = MergedAttentionFusion(DIMS, width=16, depth=1, heads=2).eval()
    block = fusion.blocks[0]
    ref = nn.TransformerEncoderLayer(16, 2, dim_feedforward=64, dropout=0.0, activation="gelu", batch_first=True,
                                     norm_first=True).eval()
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(torch.cat([block.attn.q.weight, block.attn.kv.weight]))
        ref.self_attn.in_proj_bias.copy_(torch.cat([block.attn.q.bias, block.attn.kv.bias]))
        ref.self_attn.out_proj.weight.copy_(block.attn.proj.weight)
        ref.self_attn.out_proj.bias.copy_(block.attn.proj.bias)
        ref.norm1.load_state_dict(block.norm1.state_dict())
        ref.norm2.load_state_dict(block.norm2.state_dict())
        ref.linear1.load_state_dict(block.mlp.fc1.state_dict())
        ref.linear2.load_state_dict(block.mlp.fc2.state_dict())
    tokens = _tokens()
    mask = {"audio": torch.tensor([[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]]).bool(),
            "image": torch.ones(3, 4, dtype=torch.bool)}
    with torch.no_grad():
        joint = fusion.joint(tokens, mask)
        x = torch.cat([fusion.inputs[m](tokens[m]) for m in ("audio", "image")], dim=1)
        keep = torch.cat([mask["audio"], mask["image"]], dim=1)
        expected = fusion.norm(ref(x, src_key_padding_mask=~keep))
    got = torch.cat([joint["audio"], joint["image"]], dim=1)
    assert torch.allclose(got[keep], expected[keep], atol=1e-5)  # padded positions are not compared
    assert torch.equal(fusion(tokens, mask, "image"), joint["image"])


def test_rows_are_independent_and_an_absent_modality_is_as_if_not_given() -> None:
    torch.manual_seed(0)
    fusion = MergedAttentionFusion(DIMS, width=16, depth=2, heads=2).eval()
    tokens = _tokens()
    absent = {"audio": torch.tensor([True, False, True])[:, None].expand(-1, 5),
              "image": torch.ones(3, 4, dtype=torch.bool)}
    with torch.no_grad():
        both = fusion(tokens, absent, "image")
        alone = fusion({"image": tokens["image"][1:2]}, {"image": absent["image"][1:2]}, "image")
        changed = {**tokens, "audio": tokens["audio"].clone()}
        changed["audio"][1] = 1e3  # the absent row's padding values never reach any output
        again = fusion(changed, absent, "image")
        joint = fusion.joint(tokens, absent)
    assert torch.allclose(both[1:2], alone, atol=1e-5)
    assert torch.equal(both, again)
    assert torch.equal(both, joint["image"])  # the query's states, aligned with its tokens
    assert both.shape == (3, 4, 16) and torch.isfinite(both).all()


def _build(model: dict, directory: Path) -> torch.nn.Module:
    """The model of a recipe whose ``model:`` section is ``model`` (parsed and checked as a user's recipe is)."""
    from mmssl.architectures.config import build_model
    from mmssl.pretrain.recipe import load_recipe
    from tests.conftest import write_recipe

    recipe = {"name": "merged", "data": {"train": str(directory)}, "model": model,
              "objectives": {"contrastive": {"pairs": [["audio", "image"]]}}, "train": {"steps": 1}}
    return build_model(load_recipe(write_recipe(directory / "r.yaml", recipe)).model, seed=0)


@pytest.fixture(scope="module")
def cav_mae_model(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    return _build({
        "family": "late_fusion", "embed_dim": 8,
        "fusion": {"kind": "merged", "query": "audio", "width": 16, "depth": 1, "heads": 2},
        "audio": {"arch": "vit_tiny_patch16_224", "width": 16, "depth": 1, "heads": 2, "n_mels": 16, "frames": 32,
                  "patch_size": [8, 8], "pool": "avg", "model_args": {"class_token": False}},
        "image": {"arch": "vit_tiny_patch16_224", "width": 16, "depth": 1, "heads": 2, "image_size": 16,
                  "patch_size": 8, "in_chans": 1, "pool": "avg", "model_args": {"class_token": False}},
    }, tmp_path_factory.mktemp("cav"))


def test_joint_mae_loss_is_the_masked_mse_of_present_rows(cav_mae_model: torch.nn.Module) -> None:
    from mmssl.architectures.modalities.masking import patchify
    from mmssl.data_pipelines.batch import Batch
    from mmssl.objectives.joint_mae import JointMAEConfig, JointMAEObjective

    model = cav_mae_model
    objective = JointMAEObjective(JointMAEConfig(modalities=["audio", "image"], mask_ratio=0.5, decoder_width=16,
                                                 decoder_depth=1, global_norm=False), model.spec)
    g = torch.Generator().manual_seed(1)
    present = {"audio": torch.tensor([True, True, False, True]), "image": torch.tensor([True, False, True, True])}
    inputs = {"audio": torch.randn(4, 1, 16, 32, generator=g), "image": torch.randn(4, 1, 16, 16, generator=g)}
    batch = Batch(inputs=inputs, present=present, keys=[f"k{i}" for i in range(4)])
    out = objective(model(batch.inputs, present), batch, model)

    masks = objective.make_masks(batch, model)
    assert masks["audio"].sum(1).tolist() == [4] * 4 and masks["image"].sum(1).tolist() == [2] * 4
    assert not torch.equal(masks["audio"][:, :4], masks["image"])  # each modality draws its own mask
    # the predictions the objective scored, recomputed through the same modules
    visible, keep = {}, {}
    for m in ("audio", "image"):
        feats = model.towers[m](batch.inputs[m], mask=masks[m]).features
        visible[m], keep[m] = feats, present[m][:, None].expand(-1, feats.shape[1])
    grids = {"audio": (2, 4), "image": (2, 2)}
    with torch.no_grad():
        preds = objective.decoder(model.fuse_joint(visible, keep), masks, grids, present)
    total = torch.zeros((), dtype=torch.float64)
    for m in ("audio", "image"):
        target = patchify(batch.inputs[m], (8, 8)).double()
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        sel = masks[m] & present[m][:, None]
        expected = ((preds[m].double() - target) ** 2).mean(-1)[sel].mean()
        assert abs(float(out.terms[f"mse_{m}"]) - float(expected)) < 1e-5
        total += expected
    assert abs(float(out.loss) - float(total)) < 1e-5
    # an absent modality's input reaches nothing: row 1's image is absent, row 2's audio
    changed = {"audio": inputs["audio"].clone(), "image": inputs["image"].clone()}
    changed["image"][1], changed["audio"][2] = 1e3, -1e3
    again = Batch(inputs=changed, present=present, keys=batch.keys)
    assert torch.allclose(objective(model(changed, present), again, model).loss, out.loss, atol=1e-6)
    out.loss.backward()
    assert objective.decoder.preds["image"].weight.grad.abs().sum() > 0


def test_joint_mae_needs_a_merged_fusion(tmp_path: Path) -> None:
    from mmssl.architectures.errors import ArchitectureError
    from mmssl.data_pipelines.batch import Batch
    from mmssl.objectives.joint_mae import JointMAEConfig, JointMAEObjective

    model = _build({
        "family": "late_fusion", "embed_dim": 8, "fusion": {"kind": "cross_attention", "query": "audio", "width": 16,
                                                             "depth": 1, "heads": 2},
        "audio": {"arch": "vit_tiny_patch16_224", "width": 16, "depth": 1, "heads": 2, "n_mels": 16, "frames": 32,
                  "patch_size": [8, 8]},
        "image": {"arch": "vit_tiny_patch16_224", "width": 16, "depth": 1, "heads": 2, "image_size": 16,
                  "patch_size": 8, "in_chans": 1}}, tmp_path)
    objective = JointMAEObjective(JointMAEConfig(modalities=["audio", "image"], decoder_width=16), model.spec)
    batch = Batch(inputs={"audio": torch.randn(2, 1, 16, 32), "image": torch.randn(2, 1, 16, 16)},
                  present={"audio": torch.ones(2, dtype=torch.bool), "image": torch.ones(2, dtype=torch.bool)},
                  keys=["a", "b"])
    with pytest.raises(ArchitectureError, match="kind: merged"):
        objective(model(batch.inputs), batch, model)

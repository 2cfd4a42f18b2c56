"""CLIP's towers: the text tower (``model.text.arch: clip``: transformers' ``CLIPTextModel`` built from a config,
causal, pooled at the end-of-text token), checked against open_clip's own text tower, and CLIP's width-scaled
initialisation of a timm ViT (``model.image.init: clip``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.heads import ProjectionHead
from mmssl.architectures.modalities import ImageConfig, TextConfig, get_modality
from mmssl.tools.recipes_check import placeholder_tokenizer


def _tower(tmp_path: Path, vocab: int = 64, **cfg: object) -> tuple[torch.nn.Module, TextConfig]:
    config = TextConfig(**{"arch": "clip", "pool": "eot", "width": 32, "depth": 2, "heads": 2, "max_len": 12,
                           "tokenizer": str(placeholder_tokenizer(tmp_path / "tok.json", vocab)), **cfg})
    torch.manual_seed(0)
    return get_modality("text").build_tower(config), config


def _batch(config: TextConfig, texts: list[str]) -> dict[str, torch.Tensor]:
    tok = get_modality("text").tokenizer(config)
    encoded = [tok.encode(t) for t in texts]
    return {k: torch.stack([e[k] for e in encoded]) for k in encoded[0]}


def test_parameter_count_equals_open_clip_vit_b16_text_tower(tmp_path: Path) -> None:
    """The ``clip`` recipe's text tower (512 wide, 12 layers, 8 heads, 77 tokens, 49,408 entries) plus its linear
    projection holds exactly as many parameters as open_clip's ViT-B-16 ``TextTransformer`` (with its
    ``text_projection``)."""
    from open_clip.transformer import TextTransformer

    with torch.device("meta"):
        tower, _ = _tower(tmp_path, vocab=49408, width=512, depth=12, heads=8, max_len=77)
        ours = sum(p.numel() for p in tower.parameters()) + sum(
            p.numel() for p in ProjectionHead(tower.num_features, 512).parameters())
        theirs = sum(p.numel() for p in TextTransformer(context_length=77, vocab_size=49408, width=512, heads=8,
                                                        layers=12, output_dim=512).parameters())
    assert ours == theirs == 63_428_096


def test_causal_and_pooled_at_the_end_of_text(tmp_path: Path) -> None:
    tower, config = _tower(tmp_path)
    tower.eval()
    x = _batch(config, ["[CLS] w10 w11 w12 [SEP]", "[CLS] w20 w21 w22 w23 w24 [SEP]"])
    with torch.no_grad():
        out = tower(x)
        changed = {k: v.clone() for k, v in x.items()}
        changed["input_ids"][0, 5:] = 40  # padding after row 0's end-of-text token [SEP]
        after = tower(changed)
        earlier = {k: v.clone() for k, v in x.items()}
        earlier["input_ids"][1, 3] = 41  # a real token of row 1 (w22)
        before = tower(earlier)
    eot = x["attention_mask"].sum(1) - 1
    assert torch.equal(out.pooled, out.features[torch.arange(2), eot])  # the end-of-text state
    assert torch.equal(after.pooled, out.pooled)  # nothing after the end of text reaches it
    assert torch.equal(before.features[1, :3], out.features[1, :3])  # causal: earlier states do not see token 3
    assert not torch.allclose(before.features[1, 3:], out.features[1, 3:])  # later ones do
    assert not torch.allclose(before.pooled[1], out.pooled[1])


def test_equals_open_clip_text_tower_with_the_same_weights(tmp_path: Path) -> None:
    """open_clip's ``TextTransformer`` (causal, ``pool_type='eos'``, GELU) given the tower's weights computes the same
    pooled feature (before projection) as mmssl's tower."""
    from open_clip.transformer import TextTransformer

    tower, config = _tower(tmp_path)
    tok = get_modality("text").tokenizer(config)
    specials = tok.special_ids()
    theirs = TextTransformer(context_length=12, vocab_size=tok.vocab_size, width=32, heads=2, layers=2,
                             output_dim=32, pool_type="eos", eos_id=specials["eos"], pad_id=specials["pad"],
                             act_layer=torch.nn.GELU)
    src = {k.removeprefix("model."): v for k, v in tower.state_dict().items()}
    state = {"token_embedding.weight": src["embeddings.token_embedding.weight"],
             "positional_embedding": src["embeddings.position_embedding.weight"],
             "ln_final.weight": src["final_layer_norm.weight"], "ln_final.bias": src["final_layer_norm.bias"],
             "text_projection": torch.eye(32)}
    for i in range(2):
        a, b = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            state[f"{b}attn.in_proj_{kind}"] = torch.cat([src[f"{a}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            state[f"{b}attn.out_proj.{kind}"] = src[f"{a}self_attn.out_proj.{kind}"]
            for theirs_name, ours_name in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                                           ("mlp.c_proj", "mlp.fc2")):
                state[f"{b}{theirs_name}.{kind}"] = src[f"{a}{ours_name}.{kind}"]
    theirs.load_state_dict(state)
    x = _batch(config, ["[CLS] w10 w11 w12 [SEP]", "[CLS] w20 w21 w22 w23 w24 w25 w26 w27 w28 w29 [SEP]"])
    with torch.no_grad():
        ours = tower.eval()(x).pooled
        reference = theirs.eval()(x["input_ids"])
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_a_causal_tower_refuses_first_token_pooling(tmp_path: Path) -> None:
    with pytest.raises(ArchitectureError, match=r"model\.text\.pool='cls'.*causal.*eot"):
        _tower(tmp_path, pool="cls")


@pytest.mark.parametrize(("width", "depth"), [(64, 2), (256, 6)])
def test_clip_initialisation_of_a_vit_follows_the_widths(width: int, depth: int) -> None:
    """Standard deviations of the initialised weights against CLIP's formulas, within 4 standard errors of a sample
    standard deviation (``σ / sqrt(2n)`` for ``n`` values)."""
    torch.manual_seed(0)
    cfg = ImageConfig(arch="vit_tiny_patch16_224", image_size=32, patch_size=4, width=width, depth=depth, heads=2,
                      init="clip")
    vit = get_modality("image").build_tower(cfg).model
    out = width**-0.5 * (2 * depth) ** -0.5
    expected = {"cls_token": width**-0.5, "pos_embed": width**-0.5}
    for i in range(depth):
        expected.update({f"blocks.{i}.attn.qkv.weight": width**-0.5, f"blocks.{i}.attn.proj.weight": out,
                         f"blocks.{i}.mlp.fc1.weight": (2 * width) ** -0.5, f"blocks.{i}.mlp.fc2.weight": out})
    params = {name: p.detach() for name, p in vit.named_parameters()}
    for name, std in expected.items():
        sample = float(params[name].std())
        assert abs(sample / std - 1) < 4 / (2 * params[name].numel()) ** 0.5, (name, sample, std)
    timm = get_modality("image").build_tower(ImageConfig(**{**cfg.__dict__, "init": "timm"})).model
    assert float(timm.blocks[0].attn.qkv.weight.detach().std()) < 0.021  # timm's 0.02, whatever the width


def test_clip_initialisation_is_refused_where_it_would_not_hold(tmp_path: Path) -> None:
    base = {"image_size": 32, "patch_size": 4, "width": 32, "depth": 1, "heads": 2}
    with pytest.raises(ArchitectureError, match=r"init='clip' applies to ViT towers; 'resnet18'"):
        get_modality("image").build_tower(ImageConfig(arch="resnet18", init="clip", **base))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ArchitectureError, match=r"init='clip' initialises a tower that pretrained="):
        get_modality("image").build_tower(ImageConfig(arch="vit_tiny_patch16_224", init="clip",
                                                      pretrained=str(weights), **base))
    with pytest.raises(ArchitectureError, match=r"init must be one of \['timm', 'clip'\], got 'xavier'"):
        get_modality("image").build_tower(ImageConfig(arch="vit_tiny_patch16_224", init="xavier", **base))

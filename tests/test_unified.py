"""The unified early-fusion encoder: per-modality encoding by one shared backbone, the joint (fused) pass with
missing modalities and padding masked, modality/fusion expert routing, the Perceiver bottleneck, timm contract."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from timm.models import group_parameters

from mmssl.architectures.embedders import PatchEmbedder, TokenIdEmbedder
from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.layers.perceiver import Perceiver
from mmssl.architectures.unified import FUSION_EXPERT, UnifiedModel

WIDTH, VOCAB, MAX_LEN = 32, 50, 16
# (experts, fusion_depth, latents): plain early fusion, MoME early fusion, fusion blocks, MoME + fusion expert,
# Perceiver bottleneck with fusion blocks, Perceiver with pure early fusion
CONFIGS = [(False, 0, 0), (True, 0, 0), (False, 2, 0), (True, 1, 0), (False, 1, 4), (True, 0, 3)]


def _model(seed: int = 0, **kwargs: Any) -> UnifiedModel:
    torch.manual_seed(seed)
    embedders = {"image": PatchEmbedder(3, (8, 8), (4, 4), WIDTH), "text": TokenIdEmbedder(VOCAB, MAX_LEN, WIDTH)}
    return UnifiedModel(embedders, width=WIDTH, depth=2, heads=2, embed_dim=16, **kwargs).eval()


def _config(experts: bool, fusion_depth: int, latents: int) -> dict[str, Any]:
    return {"experts": experts, "fusion_depth": fusion_depth, "latents": latents}


def _text(lengths: list[int], total: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), total), generator=g)
    mask = (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def _batch(n: int = 4, seed: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 3, 5, 6, 2, 4][:n]
    return {"image": torch.randn(n, 3, 8, 8, generator=g), "text": _text(lengths, 7, seed)}


def _rows(x: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    return {m: ({k: t[rows] for k, t in v.items()} if isinstance(v, dict) else v[rows]) for m, v in x.items()}


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-4)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_unimodal_batch_encodes_only_that_modality_as_in_a_multimodal_batch(modality: str) -> None:
    model = _model(experts=True, fusion_depth=1)
    x = _batch(3)
    calls: list[str] = []
    for m, e in model.embedders.items():
        e.register_forward_pre_hook(lambda *_, m=m: calls.append(m))
    with torch.no_grad():
        uni = model({modality: x[modality]})
        both = model(x)
    assert calls == [modality, "image", "text"]
    assert set(uni.tokens) == set(uni.pooled) == set(uni.embeddings) == set(uni.present) == {modality}
    assert uni.fused == {}
    expected_len = 4 if modality == "image" else 7  # 2x2 patches or 7 text tokens, aligned with the tokeniser's
    assert uni.tokens[modality].shape == (3, expected_len, WIDTH)
    _close(uni.embeddings[modality], uni.pooled[modality] @ model.heads[modality].proj.weight.T)
    assert uni.present[modality].all()
    mask = x["text"]["attention_mask"].bool() if modality == "text" else torch.ones(3, 4, dtype=torch.bool)
    assert torch.equal(uni.token_mask[modality], mask)
    for field in ("tokens", "pooled", "embeddings"):  # encoded separately: other modalities change nothing
        _close(getattr(uni, field)[modality], getattr(both, field)[modality])
    assert set(both.fused) == {"text"} and both.fused["text"].shape == (3, 7, WIDTH)


def test_views_use_their_modality_encoder_and_are_not_fused() -> None:
    model = _model(fusion_depth=1)
    x, x2 = _batch(3), _batch(3, seed=7)
    with torch.no_grad():
        out = model({"image": x["image"], "image@1": x2["image"], "text": x["text"]})
        ref = model({"image": x2["image"]})
    _close(out.embeddings["image@1"], ref.embeddings["image"])
    _close(out.tokens["image@1"], ref.tokens["image"])
    with torch.no_grad():
        alone = model({"image": x["image"], "text": x["text"]})
    _close(out.fused["text"], alone.fused["text"])  # the view is not part of the joint pass
    assert model({"image": x["image"], "image@1": x2["image"]}).fused == {}


@pytest.mark.parametrize(("experts", "fusion_depth", "latents"), CONFIGS)
def test_absent_modality_rows_equal_those_rows_encoded_alone(experts: bool, fusion_depth: int, latents: int) -> None:
    model = _model(**_config(experts, fusion_depth, latents))
    x = _batch(4)
    present = {"image": torch.tensor([True, False, True, False])}
    with torch.no_grad():
        out = model(x, present)
        kept = model(_rows(x, [0, 2]))
        absent = model(_rows(x, [1, 3]))
    assert torch.equal(out.present["image"], present["image"]) and out.present["text"].all()
    for field in ("tokens", "pooled", "embeddings", "fused"):  # present rows: the batch without the others
        for m, value in getattr(kept, field).items():
            _close(getattr(out, field)[m][[0, 2]], value)
    # absent rows: the joint pass over text alone (documented in architectures/unified.py)
    if fusion_depth > 0:
        text_alone = model.fuse({"text": out.tokens["text"][[1, 3]]}, {"text": out.token_mask["text"][[1, 3]]}, "text")
    else:  # pure early fusion: the backbone over the text segment alone is the unimodal pass
        text_alone = out.tokens["text"][[1, 3]]
    _close(out.fused["text"][[1, 3]], text_alone)
    assert _differs(out.fused["text"][[1, 3]], absent.fused["text"])  # where the image is present it matters


@pytest.mark.parametrize(("experts", "fusion_depth", "latents"), CONFIGS)
def test_padding_tokens_change_no_output(experts: bool, fusion_depth: int, latents: int) -> None:
    model = _model(**_config(experts, fusion_depth, latents))
    x = _batch(3)
    padded = dict(x)
    g = torch.Generator().manual_seed(5)
    extra = torch.randint(1, VOCAB, (3, 4), generator=g)  # arbitrary ids: masked tokens' content must not matter
    padded["text"] = {"input_ids": torch.cat([x["text"]["input_ids"], extra], 1),
                      "attention_mask": torch.cat([x["text"]["attention_mask"], torch.zeros(3, 4).long()], 1)}
    with torch.no_grad():
        a, b = model(x), model(padded)
    real = a.token_mask["text"]
    n = real.shape[1]
    for field in ("pooled", "embeddings"):
        for m in ("image", "text"):
            _close(getattr(a, field)[m], getattr(b, field)[m])
    _close(a.tokens["image"], b.tokens["image"])
    _close(a.tokens["text"][real], b.tokens["text"][:, :n][real])
    _close(a.fused["text"][real], b.fused["text"][:, :n][real])
    if latents:  # the bottleneck's output length does not depend on the input length
        assert b.tokens["text"].shape == a.tokens["text"].shape == (3, latents, WIDTH)
        assert b.token_mask["text"].all()


def test_modality_experts_route_by_modality() -> None:
    model = _model(experts=True)
    assert all(list(b.mlp) == list(b.norm2) == ["image", "text"] for b in model.blocks)
    assert all(b.experts is None for b in _model().blocks)  # one shared FFN
    x = _batch(3)
    with torch.no_grad():
        before = model(x)
        for block in model.blocks:
            for p in (*block.norm2["image"].parameters(), *block.mlp["image"].parameters()):
                p.add_(0.5 * torch.randn_like(p))
        after = model(x)
        text_only = model({"text": x["text"]})
    _close(after.tokens["text"], before.tokens["text"])
    _close(after.embeddings["text"], before.embeddings["text"])
    _close(text_only.embeddings["text"], before.embeddings["text"])
    assert _differs(after.tokens["image"], before.tokens["image"])
    assert _differs(after.fused["text"], before.fused["text"])  # early fusion routes image tokens to their expert


def test_fusion_expert_is_used_only_in_the_joint_pass() -> None:
    model = _model(experts=True, fusion_depth=1)
    assert list(model.fusion_blocks[0].mlp) == list(model.fusion_blocks[0].norm2) == [FUSION_EXPERT]
    x = _batch(3)
    with torch.no_grad():
        before = model(x)
        block = model.fusion_blocks[0]
        for p in (*block.norm2[FUSION_EXPERT].parameters(), *block.mlp[FUSION_EXPERT].parameters()):
            p.add_(0.5 * torch.randn_like(p))
        after = model(x)
    for field in ("tokens", "pooled", "embeddings"):
        for m in ("image", "text"):
            _close(getattr(after, field)[m], getattr(before, field)[m])
    assert _differs(after.fused["text"], before.fused["text"])


def test_fuse_is_the_forward_joint_pass_on_token_states() -> None:
    model = _model(experts=True, fusion_depth=2)
    x = _batch(3)
    with torch.no_grad():
        out = model(x)
        fused = model.fuse(out.tokens, out.token_mask, "text")
        reordered = model.fuse({"image": out.tokens["image"], "text": out.tokens["text"]},
                               {"text": out.token_mask["text"]}, "text")  # a missing mask: every token is real
    _close(fused, out.fused["text"])
    _close(reordered, out.fused["text"])
    with pytest.raises(ArchitectureError, match="fusion_depth=0"):
        _model().fuse(out.tokens, out.token_mask, "text")
    with pytest.raises(ArchitectureError, match="'audio' is not among"):
        model.fuse(out.tokens, out.token_mask, "audio")
    with_cls = torch.cat([torch.ones(3, 1, dtype=torch.bool), out.token_mask["text"]], 1)  # not aligned: rejected
    with pytest.raises(ArchitectureError, match=r"token_mask of 'text' is \[3, 8\], its tokens \[3, 7\]"):
        model.fuse(out.tokens, {**out.token_mask, "text": with_cls}, "text")


@pytest.mark.parametrize(("experts", "fusion_depth", "latents"), [c for c in CONFIGS if c[2] == 0])
def test_tokens_and_fused_states_align_with_the_input_tokens_for_mlm(experts: bool, fusion_depth: int,
                                                                      latents: int) -> None:
    model = _model(**_config(experts, fusion_depth, latents))
    x = _batch(4)
    ids, attention_mask = x["text"]["input_ids"], x["text"]["attention_mask"]
    backbone: list[torch.Tensor] = []  # the final norm's output per unimodal pass: [CLS] + tokens
    model.norm.register_forward_hook(lambda *args: backbone.append(args[-1]))
    with torch.no_grad():
        out = model(x)
    assert model.tokens_align_with_inputs
    assert out.tokens["text"].shape[1] == ids.shape[1] and out.fused["text"].shape[:2] == ids.shape
    assert torch.equal(out.token_mask["text"], attention_mask.bool())
    image_states, text_states = backbone[:2]  # encoded in the order given
    _close(out.pooled["text"], text_states[:, 0])
    _close(out.tokens["text"], text_states[:, 1:])  # position t is input token t; [CLS] only in pooled
    _close(out.tokens["image"], image_states[:, 1:])
    g = torch.Generator().manual_seed(0)
    selected = attention_mask.bool() & (torch.rand(ids.shape, generator=g) < 0.5)  # an MLM selection, [B, L]
    _close(out.tokens["text"][selected], text_states[:, 1:][selected])
    if fusion_depth == 0:
        with pytest.raises(ArchitectureError, match="fusion_depth=0"):
            model.fuse(out.tokens, out.token_mask, "text")
        return
    with torch.no_grad():  # objectives/masked.py's call: the input attention mask as the text token mask
        fused = model.fuse({"text": out.tokens["text"], "image": out.tokens["image"]},
                           {"text": attention_mask.bool(), "image": out.token_mask["image"]}, "text")
        other_image = model.fuse({"text": out.tokens["text"], "image": out.tokens["image"].flip(0)},
                                 {"text": attention_mask.bool(), "image": out.token_mask["image"]}, "text")
    _close(fused, out.fused["text"])
    assert fused[selected].shape == (int(selected.sum()), WIDTH)
    assert _differs(other_image[selected], fused[selected])  # the selected states read the image


def _perceiver_layer_by_formula(enc: Perceiver, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """One cross-attention layer written out: z + W_o softmax(Q K^T / sqrt(d) + M) V, then z + MLP(LN(z))."""
    layer = enc.layers[0]
    z = enc.latents.expand(x.shape[0], -1, -1)
    q_in = F.layer_norm(z, (WIDTH,), layer.norm_cross.weight, layer.norm_cross.bias)
    kv_in = F.layer_norm(x, (WIDTH,), layer.norm_context.weight, layer.norm_context.bias)
    attn = layer.cross_attn
    q = q_in @ attn.q.weight.T + attn.q.bias
    kv = kv_in @ attn.kv.weight.T + attn.kv.bias
    k, v = kv[..., :WIDTH], kv[..., WIDTH:]
    heads, d = attn.heads, WIDTH // attn.heads
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        scores = torch.einsum("bld,btd->blt", q[..., sl], k[..., sl]) / math.sqrt(d)
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
        outs.append(torch.einsum("blt,btd->bld", scores.softmax(-1), v[..., sl]))
    z = z + torch.cat(outs, -1) @ attn.proj.weight.T + attn.proj.bias
    h = F.layer_norm(z, (WIDTH,), layer.norm2.weight, layer.norm2.bias)
    h = F.gelu(h @ layer.mlp.fc1.weight.T + layer.mlp.fc1.bias) @ layer.mlp.fc2.weight.T + layer.mlp.fc2.bias
    return z + h


def test_perceiver_layer_matches_the_cross_attention_formula_and_ignores_token_order() -> None:
    torch.manual_seed(0)
    enc = Perceiver(WIDTH, heads=2, num_latents=3, depth=1).eval()
    x = torch.randn(2, 9, WIDTH)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 5:] = False
    with torch.no_grad():
        out = enc(x, keep)
        _close(out, _perceiver_layer_by_formula(enc, x, keep))
        assert out.shape == (2, 3, WIDTH)
        perm = torch.randperm(9)
        _close(enc(x[:, perm], keep[:, perm]), out)  # permutation invariance of cross-attention
        x2 = x.clone()
        x2[1, 5:] = 100.0  # padded keys carry no weight
        _close(enc(x2, keep), out)


def test_perceiver_model_cost_is_independent_of_input_length() -> None:
    model = _model(latents=4, fusion_depth=1)
    calls: list[int] = []
    model.blocks[0].register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[1]))
    with torch.no_grad():
        short = model({"text": _text([5, 3], 5)})
        long = model({"text": _text([14, 9], 14)})
    assert calls == [5, 5]  # the backbone always sees [CLS] + 4 latents
    assert short.tokens["text"].shape == long.tokens["text"].shape == (2, 4, WIDTH)  # the latents' states
    assert short.token_mask["text"].all() and not model.tokens_align_with_inputs
    assert _model().tokens_align_with_inputs


def _contrastive_loss(out: Any) -> torch.Tensor:
    a, b = (F.normalize(out.embeddings[m], dim=-1) for m in ("image", "text"))
    logits = a @ b.T / 0.07
    labels = torch.arange(a.shape[0])
    itm = out.fused["text"][:, 0].square().mean()  # a matching-style term through the joint pass
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2 + itm


@pytest.mark.parametrize(("experts", "fusion_depth", "latents"), [(True, 1, 0), (False, 0, 4), (True, 2, 3)])
def test_gradients_reach_every_parameter(experts: bool, fusion_depth: int, latents: int) -> None:
    model = _model(**_config(experts, fusion_depth, latents)).train()
    _contrastive_loss(model(_batch(4))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_grad_checkpointing_gives_identical_outputs_and_gradients() -> None:
    results = []
    for enable in (False, True):
        model = _model(experts=True, fusion_depth=1, latents=3, drop_path=0.2).train()
        model.set_grad_checkpointing(enable)
        calls: list[int] = []
        model.blocks[0].register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(3)  # the same DropPath draws in both runs
        out = model(_batch(4))
        _contrastive_loss(out).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)))
    (plain, g_plain, n_plain), (ckpt, g_ckpt, n_ckpt) = results
    assert n_ckpt > n_plain  # blocks really were recomputed in backward
    _close(ckpt.fused["text"], plain.fused["text"])
    for m in ("image", "text"):
        _close(ckpt.embeddings[m], plain.embeddings[m])
    assert g_plain.keys() == g_ckpt.keys()
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-5, atol=1e-6)


def test_timm_contract() -> None:
    model = _model(experts=True, fusion_depth=2, latents=3)
    x = _batch(3)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        assert feats["text"].shape == (3, 1 + 3, WIDTH)  # [CLS] + 3 latents
        _close(feats["text"][:, 1:], out.tokens["text"])
        pooled = model.forward_head(feats, pre_logits=True)
        _close(pooled["image"], feats["image"][:, 0])
        _close(pooled["image"], out.pooled["image"])
        _close(model.forward_head(feats)["text"], out.embeddings["text"])
        _close(model.encode("image", x["image"]), out.embeddings["image"])
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert {"cls_tokens.text", "type_embeds.image", "perceiver.latents", "embedders.image.pos_embed",
            "embedders.text.pos_embed"} <= nwd <= set(names)
    layer_of = group_parameters(model, model.group_matcher(), reverse=True)
    assert set(layer_of) == set(names)
    assert layer_of["embedders.image.proj.weight"] == layer_of["perceiver.latents"] == layer_of["cls_tokens.text"] == 0
    order = ["blocks.0.attn.q.weight", "blocks.1.mlp.text.fc1.weight", "fusion_blocks.0.attn.kv.weight",
             "fusion_blocks.1.norm2.fusion.weight", "heads.text.proj.weight"]
    assert [layer_of[n] for n in order] == sorted({layer_of[n] for n in order})  # strictly increasing
    assert layer_of["norm.weight"] == layer_of["blocks.1.attn.q.weight"]  # final norm joins the last block
    assert model.family == "unified" and model.spec is None and model.modalities == ["image", "text"]


def test_vit_initialisation() -> None:
    model = _model(experts=True, fusion_depth=1, latents=2)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        if isinstance(module, torch.nn.Linear) and not name.startswith("heads") and module.bias is not None:
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
    weights = torch.cat([b.attn.kv.weight.flatten() for b in model.blocks] + [model.perceiver.latents.flatten()])
    weights = weights.detach()
    assert 0.018 < float(weights.std()) < 0.022


def test_bad_configurations_raise_naming_the_value() -> None:
    with pytest.raises(ArchitectureError, match=r"'text' embedder is 16 wide but model.unified.width=32"):
        UnifiedModel({"text": TokenIdEmbedder(VOCAB, 8, 16)}, width=32, depth=1, heads=2, embed_dim=8)
    with pytest.raises(ArchitectureError, match=r"width=30 must be divisible by model.unified.heads=4"):
        UnifiedModel({"text": TokenIdEmbedder(VOCAB, 8, 30)}, width=30, depth=1, heads=4, embed_dim=8)
    with pytest.raises(ArchitectureError, match=r"query='audio' names no modality"):
        _model(query="audio")
    with pytest.raises(ArchitectureError, match=r"no embedder for modality 'audio' \(modalities: \['image', 'text'\]"):
        _model()({"audio": torch.zeros(1, 1, 8, 8)})


def test_drop_tokens_keeps_an_ordered_random_subset_of_each_rows_real_tokens_in_training_only() -> None:
    """DropToken (VATT): the backbone's input in training is [CLS] + an in-order subset of each row's embedded
    tokens, of size ⌊(1 - p)·T⌋, drawn independently per row and per call (each token kept about (1 - p) of the
    time); padding is dropped before real tokens; evaluation sees every token and equals the plain model."""
    rates = {"image": 0.5, "text": 0.5}
    model = _model(drop_token_rates=rates, fusion_depth=1)
    plain = _model(fusion_depth=1)
    x = _batch(5)  # 4 image patches; text lengths 7, 3, 5, 6, 2 of 7
    seen: list[torch.Tensor] = []
    model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        out = model(x)
        for field in ("pooled", "embeddings"):
            for m in ("image", "text"):
                _close(getattr(out, field)[m], getattr(plain(x), field)[m])
        full = {m: model._sequence(m, x[m])[0] for m in ("image", "text")}  # eval: no drop
        model.train()
        counts = torch.zeros(5, full["image"].shape[1] - 1)
        draws = 200
        for _ in range(draws):
            seen.clear()
            trained = model(x)
            image_in, text_in = seen[0], seen[1]  # backbone inputs of the two unimodal passes
            assert image_in.shape[1] == 1 + int(4 * 0.5) and text_in.shape[1] == 1 + int(7 * 0.5)
            assert trained.tokens["image"].shape[1] == 2 and trained.token_mask["text"].shape[1] == 3
            for name, got in (("image", image_in), ("text", text_in)):
                ref = full[name]
                _close(got[:, 0], ref[:, 0])  # [CLS] always kept
                # each kept token is one of the row's own tokens, at strictly increasing input positions
                dist = (got[:, 1:, None, :] - ref[:, None, 1:, :]).abs().amax(-1)  # [B, k, T]
                assert bool((dist.amin(-1) < 1e-6).all())
                pos = dist.argmin(-1)
                assert bool((pos[:, 1:] > pos[:, :-1]).all())
                if name == "image":
                    counts.scatter_add_(1, pos, torch.ones_like(pos, dtype=counts.dtype))
                else:  # the last row has 2 real tokens and keeps 3: both real ones, then one pad
                    assert trained.token_mask["text"].sum(1).tolist() == [3, 3, 3, 3, 2]
    share = counts / draws
    assert float((share - 0.5).abs().max()) < 0.15, share  # uniform: every patch kept about half the time
    assert len({tuple(r) for r in counts.tolist()}) > 1  # rows draw independently


def test_drop_tokens_bad_values_and_masked_objectives_are_refused() -> None:
    with pytest.raises(ArchitectureError, match=r"model\.unified\.drop_tokens\.audio: no such modality"):
        _model(drop_token_rates={"audio": 0.5})
    with pytest.raises(ArchitectureError, match=r"model\.unified\.drop_tokens\.image must be in \[0, 1\), got 1\.0"):
        _model(drop_token_rates={"image": 1.0})
    model = _model(drop_token_rates={"image": 0.5})
    assert not model.token_aligned("image") and model.token_aligned("text") and not model.token_aligned("image@1")

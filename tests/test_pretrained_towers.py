"""Towers from checkpoints, strictly (`architectures.checkpoints`, `architectures.towers`):

* the arch name defines the tower: ``arch: vit_base_patch16_224`` is timm's ViT-B/16, ``arch: bert`` transformers'
  BERT-base, and only the size keys a recipe sets override them; the tiny recipes build exactly the models they
  built before size keys became optional (parameter counts recorded then);
* a ViT-B/16 built from a timm ``.safetensors`` file has all 12 blocks and every tensor of the file bit for bit, and
  computes what timm's own model with those weights computes;
* a depth that does not fit the file is a one-line error naming the keys and the file, already at ``mmssl
  pretrain``'s validation (before any rank starts); ``pretrained_strict: false`` loads the part that fits;
* a transformers model saved with ``save_pretrained`` into the Hugging Face cache layout loads by its id offline
  (``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE``), tokenizer included, and a recipe's id becomes the cache directory; an id
  missing from the cache is an error naming the cache directory looked in;
* a pretrained timm tower's evaluation transform is its ``pretrained_cfg``'s (mean/std, resize of the shorter side
  to ``size / crop_pct``, centre crop), checked on non-square images against PIL and timm's ``create_transform``,
  and an exported encoder evaluates the same way.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_data_config

from mmssl.architectures.encoder import Encoder, save_encoder
from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.heads import ProjectionHead
from mmssl.architectures.modalities import get_modality
from mmssl.architectures.modalities.image import ImageConfig
from mmssl.architectures.modalities.text import TextConfig
from mmssl.architectures.modalities.tokenizers import load_tokenizer
from mmssl.pretrain.recipe import load_recipe
from mmssl.tools.recipes_check import count_parameters, placeholder_tokenizer
from tests.conftest import mmssl_in_process, write_recipe

VIT_B = "vit_base_patch16_224"
VIT_BLOCK_TENSORS = 12  # norm1, qkv, proj, norm2, fc1, fc2: a weight and a bias each

# (total, trainable) of every non-stitched tiny recipe, counted on the meta device before the size keys became
# optional (width 192 / depth 4 / heads 3 / mlp_ratio 4 / pool token were then always passed), with a 1,000-entry
# placeholder tokenizer
TINY_PARAMETERS = {
    "albef-tiny": (711339, 358379),
    "cav-mae-tiny": (310817, 310816),
    "clip-tiny": (277569, 277569),
    "factorcl-tiny": (361152, 361152),
    "flava-tiny": (490179, 490179),
    "siglip-tiny": (327426, 327426),
    "slip-tiny": (369314, 369313),
    "vatt-tiny": (197890, 197890),
    "xdc-tiny": (702624, 702624),
    "quickstart-vit": (3419905, 3419905),
}


@pytest.fixture(scope="module")
def vit_b_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViT-B/16 with random (seeded) weights and its 1000-class head, saved as timm's hub files are."""
    torch.manual_seed(0)
    model = timm.create_model(VIT_B)
    out = tmp_path_factory.mktemp("vit_b") / "vit_b16.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return out


def hub_snapshot(cache: Path, repo: str, commit: str = "0123456789abcdef") -> Path:
    """``<cache>/models--org--name/snapshots/<commit>/`` with ``refs/main`` naming it: huggingface_hub's layout."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def png(height: int, width: int, seed: int = 0) -> tuple[Image.Image, bytes]:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return image, buf.getvalue()


def centre_crop_reference(image: Image.Image, size: int, crop_pct: float, mean: list[float],
                          std: list[float]) -> torch.Tensor:
    """timm's evaluation transform computed by hand with PIL: the shorter side to ⌊size / crop_pct⌋ (bicubic,
    aspect kept), the central size x size square, then (x / 255 - mean) / std."""
    short = math.floor(size / crop_pct)
    w, h = image.size
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    resized = image.resize(new, Image.BICUBIC)
    left, top = round((new[0] - size) / 2.0), round((new[1] - size) / 2.0)
    pixels = np.asarray(resized.crop((left, top, left + size, top + size)))
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def test_the_arch_name_defines_the_tower_and_only_set_size_keys_override_it(spm: Path) -> None:
    image, text = get_modality("image"), get_modality("text")
    with torch.device("meta"):
        vit_b = image.build_tower(ImageConfig(arch=VIT_B))
        timm_vit_b = timm.create_model(VIT_B, num_classes=0)
        small = image.build_tower(ImageConfig(arch=VIT_B, image_size=32, patch_size=8, width=64, depth=2, heads=2))
        bert = text.build_tower(TextConfig(tokenizer=str(spm)))
        tiny_bert = text.build_tower(TextConfig(tokenizer=str(spm), width=64, depth=2, heads=2))
    assert len(vit_b.model.blocks) == 12 and vit_b.num_features == 768
    assert sum(p.numel() for p in vit_b.parameters()) == sum(p.numel() for p in timm_vit_b.parameters())
    assert len(small.model.blocks) == 2 and small.num_features == 64 and small.model.patch_embed.patch_size == (8, 8)
    c = bert.model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (768, 12, 12, 3072)
    c = tiny_bert.model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (64, 2, 2, 256)


@pytest.mark.parametrize("name", sorted(TINY_PARAMETERS))
def test_tiny_recipes_build_the_models_they_built_before(name: str, tmp_path: Path) -> None:
    recipe = load_recipe(name)
    if "text" in recipe.model.towers:
        recipe.model.towers["text"].tokenizer = str(placeholder_tokenizer(tmp_path / "tokenizer.json", 1000))
    counts = count_parameters(recipe)
    assert (counts.total, counts.trainable) == TINY_PARAMETERS[name]


def test_vit_b16_from_a_timm_file_has_every_block_and_the_files_tensors(vit_b_file: Path) -> None:
    tower = get_modality("image").build_tower(ImageConfig(arch=VIT_B, pretrained=str(vit_b_file))).eval()
    saved, own = load_file(str(vit_b_file)), tower.model.state_dict()
    assert len(tower.model.blocks) == 12 and tower.num_features == 768
    assert tower.model.patch_embed.patch_size == (16, 16) and tower.model.pos_embed.shape == (1, 197, 768)
    assert set(saved) - set(own) == {"head.weight", "head.bias"}  # the classifier: a tower has none
    assert set(own) <= set(saved)
    for key, value in own.items():
        assert torch.equal(value, saved[key]), key
    assert tower.source == str(vit_b_file.resolve())
    reference = timm.create_model(VIT_B, num_classes=0).eval()
    reference.load_state_dict({k: v for k, v in saved.items() if not k.startswith("head.")})
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(tower(x).pooled, reference(x), rtol=0, atol=0)


def test_a_depth_that_does_not_fit_the_file_fails_naming_keys_unless_opted_in(
        vit_b_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    plugin = get_modality("image")
    cfg = ImageConfig(arch=VIT_B, pretrained=str(vit_b_file), depth=4)
    for device in ("meta", "cpu"):  # the shape-only build (recipe validation) reads the file's header
        with torch.device(device), pytest.raises(ArchitectureError) as err:
            plugin.build_tower(cfg)
        message = str(err.value)
        assert "\n" not in message and message.startswith("model.image.pretrained: ")
        assert str(vit_b_file) in message and "pretrained_strict: false" in message
        assert f"{8 * VIT_BLOCK_TENSORS} file keys the tower lacks (blocks.4." in message, message
    caplog.set_level(logging.WARNING)
    partial = plugin.build_tower(replace(cfg, pretrained_strict=False))
    saved, own = load_file(str(vit_b_file)), partial.model.state_dict()
    assert len(partial.model.blocks) == 4
    assert all(torch.equal(value, saved[key]) for key, value in own.items())
    assert "not loaded" in caplog.text and "blocks.4." in caplog.text and str(vit_b_file) in caplog.text


def test_mmssl_pretrain_refuses_a_checkpoint_that_does_not_fit_before_launch(
        vit_b_file: Path, fashion: tuple[Path, Path], tmp_path: Path) -> None:
    train, spm = fashion
    recipe = {"name": "vit-b-depth-4", "data": {"train": str(train), "batch_size": 4, "num_workers": 0},
              "model": {"embed_dim": 16,
                        "image": {"arch": VIT_B, "pretrained": str(vit_b_file), "depth": 4, "in_chans": 3},
                        "text": {"tokenizer": str(spm), "width": 32, "depth": 1, "heads": 2, "max_len": 16}},
              "objectives": {"contrastive": {"pairs": [["image", "text"]]}},
              "train": {"steps": 1, "tensorboard": False}}
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    done = mmssl_in_process("pretrain", str(path), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("mmssl: error: model.image.pretrained: ") and "blocks.4." in line, line
    assert str(vit_b_file) in line and not (tmp_path / "run" / "logs").exists()  # no rank started
    done = mmssl_in_process("pretrain", str(path), "model.text.pretrained=org-x/not-cached", "--run-dir",
                            str(tmp_path / "run"))
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and line.startswith("mmssl: error: model.text.pretrained: "), done.stderr
    assert "models--org-x--not-cached" in line and "never downloads" in line


def test_a_transformers_model_loads_by_its_id_from_the_local_cache_offline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spm: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM, BertModel

    cache = tmp_path / "hub"
    snapshot = hub_snapshot(cache, "org-x/tiny-bert")
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=16))  # with its pooler, as shipped
    bert.save_pretrained(str(snapshot))
    shutil.copy(spm, snapshot / "spm.model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cfg = TextConfig(pretrained="org-x/tiny-bert", max_len=16)
    tower = get_modality("text").build_tower(cfg)
    saved, own = load_file(str(snapshot / "model.safetensors")), tower.model.state_dict()
    assert set(saved) - set(own) == {"pooler.dense.weight", "pooler.dense.bias"}  # towers pool themselves
    assert set(own) <= set(saved)
    for key, value in own.items():
        assert torch.equal(value, saved[key]), key
    assert tower.source == str((snapshot / "model.safetensors").resolve())
    tokenizer = get_modality("text").tokenizer(cfg)  # the snapshot's
    assert tokenizer.vocab_size == load_tokenizer(str(spm), 16).vocab_size and tokenizer.encode("one two")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", {"name": "hub", "model": {"text": {"max_len": 16}}}),
                         ["model.text.pretrained=org-x/tiny-bert"])
    assert recipe.model.towers["text"].pretrained == str(snapshot.resolve())
    with pytest.raises(ArchitectureError) as err:  # a recipe depth the checkpoint does not have
        get_modality("text").build_tower(replace(cfg, depth=3))
    assert "tower keys missing from the file (encoder.layer.2." in str(err.value)
    assert "\n" not in str(err.value) and str(snapshot) in str(err.value)

    # a checkpoint saved with a task head (BERT's own are): the base model loads strictly, the head is left out
    BertForMaskedLM(bert.config).save_pretrained(str(tmp_path / "mlm"))
    tower = get_modality("text").build_tower(TextConfig(pretrained=str(tmp_path / "mlm"), max_len=16))
    saved = load_file(str(tmp_path / "mlm" / "model.safetensors"))
    assert all(torch.equal(value, saved[f"bert.{key}"]) for key, value in tower.model.state_dict().items())


def test_an_id_missing_from_the_cache_names_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cases = [("text", TextConfig(pretrained="org-x/absent"), "models--org-x--absent"),
             ("image", ImageConfig(pretrained="hf-hub:timm/absent_vit.tag"), "models--timm--absent_vit.tag")]
    for modality, cfg, folder in cases:
        with pytest.raises(ArchitectureError) as err:
            get_modality(modality).build_tower(cfg)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"model.{modality}.pretrained: ")
        assert str(cache / folder) in message and "never downloads" in message


def test_a_pretrained_timm_towers_evaluation_transform_is_its_pretrained_cfgs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    arch = "deit_tiny_patch16_224"  # timm's config: ImageNet mean/std, crop_pct 0.9, bicubic, 224 px
    weights = tmp_path / "deit.safetensors"
    save_file(timm.create_model(arch).state_dict(), str(weights))
    cfg = ImageConfig(arch=arch, pretrained=str(weights))
    image, data = png(150, 260)  # wider than tall
    rng = np.random.default_rng(0)
    got = get_modality("image").decoder(cfg, train=False)(data, rng)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    torch.testing.assert_close(got, centre_crop_reference(image, 224, 0.9, mean, std), rtol=0, atol=1e-6)
    tower = get_modality("image").build_tower(cfg)
    timm_eval = create_transform(**resolve_data_config({}, model=tower.model))
    torch.testing.assert_close(got, timm_eval(image), rtol=0, atol=1e-6)
    own = get_modality("image").decoder(replace(cfg, mean=[0.25], std=[0.5]), train=False)(data, rng)
    torch.testing.assert_close(own, centre_crop_reference(image, 224, 0.9, [0.25] * 3, [0.5] * 3), rtol=0, atol=1e-6)
    # not pretrained: as before, the whole image resized to the square (bilinear), mean = std = 0.5
    fresh = get_modality("image").decoder(ImageConfig(arch=arch), train=False)(data, rng)
    squashed = np.asarray(image.resize((224, 224), Image.BILINEAR)).copy()
    expected = (torch.from_numpy(squashed).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5
    torch.testing.assert_close(fresh, expected, rtol=0, atol=2 * 2 / 255)  # torchvision's antialias vs PIL's


def test_a_timm_hub_snapshot_brings_its_preprocessing_and_an_export_keeps_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    snapshot = hub_snapshot(cache, "timm/vit_tiny_patch16_224.unit_test")
    args = {"img_size": 48, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=5, **args).state_dict(),
              str(snapshot / "model.safetensors"))
    data_cfg = {"input_size": [3, 48, 48], "mean": [0.3, 0.4, 0.5], "std": [0.2, 0.25, 0.3], "crop_pct": 0.8,
                "interpolation": "bicubic", "crop_mode": "center", "num_classes": 5, "classifier": "head"}
    (snapshot / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 5,
                                                      "model_args": args, "pretrained_cfg": data_cfg}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cfg = ImageConfig(arch="vit_tiny_patch16_224", pretrained="hf-hub:timm/vit_tiny_patch16_224.unit_test")
    tower = get_modality("image").build_tower(cfg).eval()
    saved = load_file(str(snapshot / "model.safetensors"))
    assert all(torch.equal(value, saved[key]) for key, value in tower.model.state_dict().items())
    image, data = png(70, 45, seed=1)  # taller than wide
    rng = np.random.default_rng(0)
    got = get_modality("image").decoder(cfg, train=False)(data, rng)
    expected = centre_crop_reference(image, 48, 0.8, data_cfg["mean"], data_cfg["std"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    head = ProjectionHead(tower.num_features, 8, "linear")
    out = save_encoder(tmp_path / "encoder", "image", cfg, tower, head, 8)
    encoder = Encoder.from_dir(out)
    torch.testing.assert_close(encoder.decoder()(data, rng), got, rtol=0, atol=0)
    timm_model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    torch.testing.assert_close(create_transform(**resolve_data_config({}, model=timm_model))(image), got, rtol=0,
                               atol=1e-6)
    x = got.unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), tower(x).pooled, rtol=0, atol=0)
        torch.testing.assert_close(encoder(x)[0], tower(x).pooled, rtol=0, atol=0)

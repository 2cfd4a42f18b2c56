"""Images: PNG/JPEG bytes -> resized, normalised tensor -> any timm model (ViT by default, CNNs too).

Training augmentation (only when ``train`` and enabled): random resized crop (scale ``crop_scale``, aspect ratio
3/4..4/3) and horizontal flip, drawn from the per-sample generator the stream supplies, so a resumed run
augments each sample exactly as the uninterrupted run would.

Geometry and normalisation (`image_preprocessing`): what a recipe leaves unset (None) is the tower's own. A
pretrained tower's comes from its timm ``pretrained_cfg`` (the checkpoint directory's ``config.json``, else the
arch's): ``image_size`` its input size, ``mean`` / ``std``, ``interpolation``, and for evaluation timm's centre crop
(``transforms_imagenet_eval``): the shorter side resized to ``⌊image_size / crop_pct⌋`` with the aspect ratio kept,
then the central ``image_size`` square. Other towers: the arch's input size, mean = std = 0.5, bilinear, and the
whole image resized to the square (no crop) unless ``crop_pct`` is set. ``patch_size`` unset: the arch's.

Corruptions (robustness evaluation, `ImagePlugin.corrupted_decoder`), applied to the ``[0, 1]`` pixels after resizing
and before normalisation, at ``level ∈ [0, 1]``:

* ``blur``: Gaussian blur of std ``σ = 0.1·level·image_size`` pixels (3.2 px at level 1 for 32 px images);
* ``occlusion``: one random rectangle covering ``level`` of the image area, filled with the normalisation ``mean``
  (exactly 0 after normalisation);
* ``noise``: additive Gaussian noise of std ``level`` (in ``[0, 1]`` pixel units, not clipped).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from mmssl.architectures.checkpoints import find_pretrained, timm_dir_args, timm_pretrained_cfg
from mmssl.architectures.embedders import PatchEmbedder
from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.modalities import corruptions
from mmssl.architectures.modalities.base import DecoderFn, MaskedView, ModalityPlugin, TowerConfig, timm_tower
from mmssl.architectures.modalities.masking import Generators, block_mask, patchify, random_token_mask
from mmssl.architectures.towers import TimmTower, Tower


@dataclass
class ImageConfig(TowerConfig):
    """``image_size``, ``patch_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``: None is the tower's own
    (module docstring)."""

    arch: str = "vit_tiny_patch16_224"
    image_size: int | None = None
    patch_size: int | None = None
    in_chans: int = 3
    mean: list[float] | None = None
    std: list[float] | None = None
    crop_pct: float | None = None  # evaluation: centre crop of image_size from the shorter side at image_size/crop_pct
    interpolation: str | None = None  # bilinear, bicubic, nearest, lanczos, ...
    random_resized_crop: bool = False
    crop_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])
    hflip: bool = False


PixelCorruption = Callable[[Tensor, np.random.Generator], Tensor]
BLUR_SIGMA_PER_SIDE = 0.1  # blur std at level 1, as a fraction of the image side


DEFAULT_MEAN_STD = [0.5]  # towers with no pretrained config
DEFAULT_INTERPOLATION = "bilinear"


@dataclass(frozen=True)
class ImagePreprocessing:
    """Resolved image geometry and normalisation (`image_preprocessing`); ``crop_pct`` None: evaluation resizes the
    whole image to the square."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float | None
    interpolation: str

    def data_config(self) -> dict[str, Any]:
        """The same as timm ``pretrained_cfg`` fields (``crop_mode: squash`` for the whole-image resize)."""
        return {"mean": self.mean, "std": self.std, "interpolation": self.interpolation,
                "crop_pct": self.crop_pct or 1.0, "crop_mode": "center" if self.crop_pct else "squash"}


def image_preprocessing(cfg: ImageConfig) -> ImagePreprocessing:
    """``cfg``'s preprocessing with what it leaves unset filled in from the tower's own config (module docstring)."""
    if not timm.is_model(cfg.arch):
        raise ArchitectureError(f"model.image.arch: unknown timm architecture {cfg.arch!r}")
    own = timm_pretrained_cfg(cfg.arch, cfg.pretrained)
    size = cfg.image_size or (own.get("input_size") or (None,))[-1]
    if not size:
        raise ArchitectureError(f"model.image.image_size is not set and timm {cfg.arch!r} declares no input size")
    crop_pct = cfg.crop_pct
    if crop_pct is None and cfg.pretrained and own.get("crop_mode", "center") != "squash":
        crop_pct = own.get("crop_pct")
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise ArchitectureError(f"model.image.crop_pct must be in (0, 1], got {crop_pct}")
    interpolation = cfg.interpolation or (own.get("interpolation") if cfg.pretrained else None)
    interpolation = interpolation or DEFAULT_INTERPOLATION
    try:
        InterpolationMode(interpolation)
    except ValueError:
        raise ArchitectureError(f"model.image.interpolation={interpolation!r} is not one of "
                                f"{[m.value for m in InterpolationMode]}") from None
    mean = cfg.mean or (list(own["mean"]) if cfg.pretrained and own.get("mean") else DEFAULT_MEAN_STD)
    std = cfg.std or (list(own["std"]) if cfg.pretrained and own.get("std") else DEFAULT_MEAN_STD)
    return ImagePreprocessing(int(size), tuple(map(float, mean)), tuple(map(float, std)), crop_pct, interpolation)


@lru_cache(maxsize=64)
def arch_patch_size(arch: str, pretrained: str | None) -> int | None:
    """The patch side of timm ``arch`` as built by default (with a pretrained directory's ``model_args``), from a
    shape-only build; None for models without patches."""
    location = find_pretrained(pretrained) if pretrained else None
    args = timm_dir_args(location, arch, "model.image") if location is not None else {}
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0, **args)
    embed = getattr(model, "patch_embed", None)
    return int(embed.patch_size[0]) if embed is not None and hasattr(embed, "patch_size") else None


def patch_side(cfg: ImageConfig) -> int:
    """``cfg.patch_size``, or the arch's own when unset."""
    patch = cfg.patch_size or arch_patch_size(cfg.arch, cfg.pretrained)
    if not patch:
        raise ArchitectureError(f"model.image.patch_size is not set and timm {cfg.arch!r} cuts no patches")
    return int(patch)


def resize_centre_crop(img: Image.Image, size: int, crop_pct: float, interpolation: str) -> Image.Image:
    """timm's evaluation geometry (``transforms_imagenet_eval``, crop mode ``center``) on a PIL image: the shorter
    side resized to ``⌊size / crop_pct⌋`` (aspect ratio kept), then the central ``size x size`` crop."""
    img = TF.resize(img, [math.floor(size / crop_pct)], interpolation=InterpolationMode(interpolation))
    return TF.center_crop(img, [size, size])


class ImageDecoder:
    """Bytes -> ``[C, H, W]`` normalised pixels; ``corrupt`` (evaluation corruptions) acts on the resized ``[0, 1]``
    pixels before normalisation. ``compact``: the resized (and augmented) pixels as uint8 instead, for
    `PixelNormalizer` to finish on the device. Evaluation with a ``crop_pct`` (`image_preprocessing`) takes the
    centre crop (`resize_centre_crop`), training and other evaluation resize the image (crop) to the square;
    evaluation interpolates as the tower's config says, training bilinearly unless the recipe sets another."""

    def __init__(self, cfg: ImageConfig, train: bool, corrupt: PixelCorruption | None = None, *,
                 compact: bool = False) -> None:
        self.cfg = cfg
        self.train = train
        self.corrupt = corrupt
        self.compact = compact
        if compact and corrupt is not None:
            raise ValueError("corruptions act on float pixels: a compact (uint8) decoder takes none")
        self.prep = image_preprocessing(cfg)
        mode = (cfg.interpolation or DEFAULT_INTERPOLATION) if train else self.prep.interpolation
        self.mode = InterpolationMode(mode)
        channels = cfg.in_chans
        self.mean = torch.tensor((list(self.prep.mean) * channels)[:channels]).view(-1, 1, 1)
        self.std = torch.tensor((list(self.prep.std) * channels)[:channels]).view(-1, 1, 1)

    def __call__(self, data: bytes, rng: np.random.Generator) -> Tensor:
        cfg, prep = self.cfg, self.prep
        cropped = not self.train and prep.crop_pct is not None
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if cfg.in_chans == 1 else "RGB")
            if cropped:
                img = resize_centre_crop(img, prep.image_size, prep.crop_pct, prep.interpolation)
            x = TF.pil_to_tensor(img)
        x = x if self.compact else x.float() / 255.0
        size = [prep.image_size, prep.image_size]
        if cropped:
            pass
        elif self.train and cfg.random_resized_crop:
            top, left, h, w = _crop_box(x.shape[-2], x.shape[-1], cfg.crop_scale, rng)
            x = TF.resized_crop(x, top, left, h, w, size, interpolation=self.mode, antialias=True)
        else:
            x = TF.resize(x, size, interpolation=self.mode, antialias=True)
        if self.train and cfg.hflip and rng.random() < 0.5:
            x = x.flip(-1)
        if self.compact:
            return x.contiguous()
        if self.corrupt is not None:
            x = self.corrupt(x, rng)
        return ((x - self.mean) / self.std).contiguous()


class PixelNormalizer:
    """uint8 ``[..., C, H, W]`` pixels -> ``(x/255 - mean) / std`` in float32, on the pixels' device (the device
    copies of ``mean`` / ``std`` are made once per device)."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        self.mean, self.std = mean.float(), std.float()
        self.on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, x: Tensor) -> Tensor:
        if x.device not in self.on:
            self.on[x.device] = (self.mean.to(x.device), self.std.to(x.device))
        mean, std = self.on[x.device]
        return (x.float() / 255.0 - mean) / std


def pixel_corruption(kind: str, level: float, image_size: int, mean: Tensor) -> PixelCorruption:
    """The ``[0, 1]``-pixel corruption of ``kind`` at ``level`` (module docstring); ``mean``: the occlusion fill
    (per channel). Shared with the video decoder, which applies it to every frame."""
    if kind == "blur":
        return corruptions.Bound(corruptions.gaussian_blur, BLUR_SIGMA_PER_SIDE * level * image_size)
    if kind == "occlusion":
        return corruptions.Bound(corruptions.occlude, level, {"fill": mean.flatten()})
    if kind == "noise":
        return corruptions.Bound(corruptions.add_gaussian_noise, level)
    raise ValueError(f"unknown pixel corruption {kind!r}")


def _crop_box(height: int, width: int, scale: list[float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return 0, 0, height, width


class ImagePlugin(ModalityPlugin):
    name = "image"
    config_cls = ImageConfig
    extensions = ("png", "jpg", "jpeg", "webp")
    corruptions = ("blur", "occlusion", "noise")

    def decoder(self, cfg: ImageConfig, *, train: bool) -> DecoderFn:
        return ImageDecoder(cfg, train)

    def compact_decoder(self, cfg: ImageConfig) -> tuple[DecoderFn, PixelNormalizer]:
        decoder = ImageDecoder(cfg, train=True, compact=True)
        return decoder, PixelNormalizer(decoder.mean, decoder.std)

    def build_corrupted_decoder(self, cfg: ImageConfig, kind: str, level: float) -> ImageDecoder:
        """The evaluation decoder with ``kind`` at ``level`` applied to the resized pixels (module docstring)."""
        clean = ImageDecoder(cfg, train=False)
        return ImageDecoder(cfg, train=False, corrupt=pixel_corruption(kind, level, clean.prep.image_size,
                                                                        clean.mean))

    def build_tower(self, cfg: ImageConfig) -> TimmTower:
        prep = image_preprocessing(cfg)
        return timm_tower(cfg, in_chans=cfg.in_chans, img_size=[prep.image_size] * 2, patch_size=cfg.patch_size,
                          where="model.image", data_config=prep.data_config())

    def export_assets(self, cfg: ImageConfig, out_dir: Path) -> dict[str, Any]:
        """The resolved preprocessing (`image_preprocessing`) and patch size, written into the exported tower
        config so that the export evaluates as the run did, whatever the arch's defaults."""
        prep = image_preprocessing(cfg)
        patch = cfg.patch_size or arch_patch_size(cfg.arch, cfg.pretrained)
        return {"image_size": prep.image_size, "patch_size": patch, "mean": list(prep.mean), "std": list(prep.std),
                "crop_pct": prep.crop_pct, "interpolation": prep.interpolation}

    def build_embedder(self, cfg: ImageConfig, width: int) -> PatchEmbedder:
        size, patch = image_preprocessing(cfg).image_size, patch_side(cfg)
        return PatchEmbedder(cfg.in_chans, (size, size), (patch, patch), width)

    def mask_kinds(self, cfg: ImageConfig) -> tuple[str, ...]:
        return ("random", "block")

    def mask(self, cfg: ImageConfig, x: Tensor, ratio: float, generator: Generators = None, *,
             kind: str | None = None, span_length: int = 1) -> Tensor:
        """Over the ``N`` patches: ``random``, MAE's uniform masking of exactly ``⌊ratio·N + ½⌋`` per row;
        ``block``, BEiT's blockwise masking of at least that many."""
        kind = self.check_mask_kind(cfg, kind)
        patch = patch_side(cfg)
        grid = (x.shape[-2] // patch, x.shape[-1] // patch)
        if kind == "block":
            return block_mask(x.shape[0], grid, ratio, generator, device=x.device)
        return random_token_mask(x.shape[0], grid[0] * grid[1], ratio, generator, device=x.device)

    def target(self, cfg: ImageConfig, x: Tensor) -> Tensor:
        """The patches' pixels ``[B, N, ph·pw·C]`` (`patchify` order, the embedder's token order)."""
        return patchify(x, (patch_side(cfg),) * 2)

    def masked_view(self, cfg: ImageConfig, tower: Tower) -> MaskedView | None:
        """A timm ViT encodes the ``(H/p, W/p)`` patch grid (`TimmTower`'s masked forward)."""
        shape = tower.patch_shape() if isinstance(tower, TimmTower) else None
        p, size = (cfg.patch_size or (shape[1] if shape else 0)), image_preprocessing(cfg).image_size
        return vit_masked_view("image", tower, (cfg.in_chans, p, p), (size // max(p, 1),) * 2)

    def random_example(self, cfg: ImageConfig, batch_size: int) -> Tensor:
        size = image_preprocessing(cfg).image_size
        return torch.randn(batch_size, cfg.in_chans, size, size)


def vit_masked_view(modality: str, tower: Tower, patch: tuple[int, int, int],
                    grid: tuple[int, int]) -> MaskedView | None:
    """The masked view of a timm ViT tower cutting ``patch = (C, ph, pw)`` patches over ``grid``, or None for
    other towers; the tower's own patches must be the plug-in's (a ``model_args.patch_size`` that differs is an
    error: the masks and targets are cut from the plug-in's)."""
    shape = tower.patch_shape() if isinstance(tower, TimmTower) else None
    if shape is None:
        return None
    if tuple(shape) != tuple(patch):
        raise ArchitectureError(f"model.{modality}: the tower cuts (channels, height, width) = {tuple(shape)} patches "
                                f"but the {modality} plug-in {tuple(patch)} (set model.{modality}.patch_size, not "
                                "model_args.patch_size)")
    return MaskedView(grid, patch[0] * patch[1] * patch[2])

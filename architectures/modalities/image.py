"""Images: PNG/JPEG bytes -> resized, normalised tensor -> any timm model (ViT by default, CNNs too).

Training augmentation (only when ``train`` and enabled): random resized crop (scale ``crop_scale``, aspect ratio
3/4..4/3) and horizontal flip, drawn from the per-sample generator the stream supplies, so a resumed run
augments each sample exactly as the uninterrupted run would.

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

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from mmssl.architectures.embedders import PatchEmbedder
from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.modalities import corruptions
from mmssl.architectures.modalities.base import DecoderFn, MaskedView, ModalityPlugin, TowerConfig, timm_tower
from mmssl.architectures.modalities.masking import Generators, block_mask, patchify, random_token_mask
from mmssl.architectures.towers import TimmTower, Tower


@dataclass
class ImageConfig(TowerConfig):
    arch: str = "vit_tiny_patch16_224"
    image_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    random_resized_crop: bool = False
    crop_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])
    hflip: bool = False


PixelCorruption = Callable[[Tensor, np.random.Generator], Tensor]
BLUR_SIGMA_PER_SIDE = 0.1  # blur std at level 1, as a fraction of the image side


class ImageDecoder:
    """Bytes -> ``[C, H, W]`` normalised pixels; ``corrupt`` (evaluation corruptions) acts on the resized ``[0, 1]``
    pixels before normalisation. ``compact``: the resized (and augmented) pixels as uint8 instead, for
    `PixelNormalizer` to finish on the device."""

    def __init__(self, cfg: ImageConfig, train: bool, corrupt: PixelCorruption | None = None, *,
                 compact: bool = False) -> None:
        self.cfg = cfg
        self.train = train
        self.corrupt = corrupt
        self.compact = compact
        if compact and corrupt is not None:
            raise ValueError("corruptions act on float pixels: a compact (uint8) decoder takes none")
        channels = cfg.in_chans
        self.mean = torch.tensor((cfg.mean * channels)[:channels]).view(-1, 1, 1)
        self.std = torch.tensor((cfg.std * channels)[:channels]).view(-1, 1, 1)

    def __call__(self, data: bytes, rng: np.random.Generator) -> Tensor:
        cfg = self.cfg
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if cfg.in_chans == 1 else "RGB")
            x = TF.pil_to_tensor(img)
        x = x if self.compact else x.float() / 255.0
        size = [cfg.image_size, cfg.image_size]
        if self.train and cfg.random_resized_crop:
            top, left, h, w = _crop_box(x.shape[-2], x.shape[-1], cfg.crop_scale, rng)
            x = TF.resized_crop(x, top, left, h, w, size, antialias=True)
        else:
            x = TF.resize(x, size, antialias=True)
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
        return ImageDecoder(cfg, train=False, corrupt=pixel_corruption(kind, level, cfg.image_size, clean.mean))

    def build_tower(self, cfg: ImageConfig) -> TimmTower:
        size = [cfg.image_size, cfg.image_size]
        return timm_tower(cfg, in_chans=cfg.in_chans, img_size=size, patch_size=cfg.patch_size)

    def build_embedder(self, cfg: ImageConfig, width: int) -> PatchEmbedder:
        size, patch = (cfg.image_size, cfg.image_size), (cfg.patch_size, cfg.patch_size)
        return PatchEmbedder(cfg.in_chans, size, patch, width)

    def mask_kinds(self, cfg: ImageConfig) -> tuple[str, ...]:
        return ("random", "block")

    def mask(self, cfg: ImageConfig, x: Tensor, ratio: float, generator: Generators = None, *,
             kind: str | None = None, span_length: int = 1) -> Tensor:
        """Over the ``N`` patches: ``random``, MAE's uniform masking of exactly ``⌊ratio·N + ½⌋`` per row;
        ``block``, BEiT's blockwise masking of at least that many."""
        kind = self.check_mask_kind(cfg, kind)
        grid = (x.shape[-2] // cfg.patch_size, x.shape[-1] // cfg.patch_size)
        if kind == "block":
            return block_mask(x.shape[0], grid, ratio, generator, device=x.device)
        return random_token_mask(x.shape[0], grid[0] * grid[1], ratio, generator, device=x.device)

    def target(self, cfg: ImageConfig, x: Tensor) -> Tensor:
        """The patches' pixels ``[B, N, ph·pw·C]`` (`patchify` order, the embedder's token order)."""
        return patchify(x, (cfg.patch_size, cfg.patch_size))

    def masked_view(self, cfg: ImageConfig, tower: Tower) -> MaskedView | None:
        """A timm ViT encodes the ``(H/p, W/p)`` patch grid (`TimmTower`'s masked forward)."""
        p = cfg.patch_size
        return vit_masked_view("image", tower, (cfg.in_chans, p, p), (cfg.image_size // p, cfg.image_size // p))

    def random_example(self, cfg: ImageConfig, batch_size: int) -> Tensor:
        return torch.randn(batch_size, cfg.in_chans, cfg.image_size, cfg.image_size)


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

"""Video: frames -> a timm image model per frame -> a temporal transformer over the frame features.

Decoding (per sample, in loader workers): a ``.npy`` array ``[T, H, W, C]`` or ``[T, H, W]`` (uint8 / integer
scaled by its dtype's maximum, floats taken as ``[0, 1]``), or an animated GIF / multi-frame WebP (any multi-frame
image PIL reads), gives ``n`` source frames. ``frames`` of them are sampled uniformly, segment-wise (TSN, Wang et
al. 2016)::

    index_i = min(n - 1, ⌊(i + u) · n / frames⌋),   i = 0 .. frames-1

with ``u ~ U[0, 1)`` from the per-sample generator when training (a random temporal offset inside each segment) and
``u = ½`` (segment centres) otherwise. Each frame is resized to ``image_size`` squared and normalised
``(x - mean) / std``; the result is ``[C, T, H, W]``.

Tower (`VideoTower`; or a 3-D CNN over the whole clip for ``arch: r2plus1d_18 | r3d_18 | mc3_18``,
`architectures.modalities.video_cnn`): the frames are folded into the batch and encoded by a timm image model (any
architecture by name; ViT sizes from the config as for images), each frame's pooled feature ``f_t`` gets a learned
temporal embedding ``e_t``, and ``temporal_depth`` timm transformer blocks run over the ``T`` frame tokens (a
factorised space-time encoder, ViViT's model 2, Arnab et al. 2021)::

    h = LN(Blocks([f_1 + e_1, ..., f_T + e_T]))     forward_features: [B, T, D];   forward_head: mean_t h_t

Token embedder (`TubeletEmbedder`, ViViT's tubelet embedding): non-overlapping ``tubelet x patch x patch`` tubes,
each linearly projected (a Conv3d with kernel = stride), plus a factorised learned position: a spatial table over the
``gh·gw`` patch positions and a temporal table over the ``G = T / tubelet`` groups. Tokens are group-major
(``g·gh·gw + s``). Masking is tube masking (VideoMAE, Tong et al. 2022): the same ``⌊ratio·S + ½⌋`` spatial
positions in every group. Target: the tubelet pixels ``[B, G·gh·gw, tubelet·ph·pw·C]`` (channels last).

Masked view (`VideoTower` over a ViT frame model; the towers' masked-forward contract, `Tower.forward`): the mask
over the ``G·gh·gw`` tubelet tokens is given to each of a group's ``tubelet`` frames; the frame ViT encodes every
frame with its masked patches replaced by the mask token (replace mode) or dropped (drop mode, ``visible / G`` kept
per frame: a tube mask); a tubelet token's state is the mean over its frames of the patch states ``z_{t,s}``; and
the temporal transformer's states of the masked frames' pooled features lead as prefix tokens::

    features = [h_1, ..., h_T ; mean_{t ∈ g} z_{t,s} for the (g, s) kept]      [B, T + G·gh·gw (or + visible), D]

so masked prediction trains the frame model through the patch tokens and the temporal transformer through the
prefix (MAE's decoder attends to it). Known difference from VideoMAE, whose encoder is a joint space-time ViT over
the tubelets: here space and time are factorised, so a patch state sees its own frame only and temporal context
reaches the decoder through the frame states.

Corruptions (robustness evaluation, `VideoPlugin.corrupted_decoder`), applied to the sampled, resized ``[0, 1]``
frames ``[T, C, H, W]`` before normalisation, at ``level ∈ [0, 1]``:

* ``frame_drop``: ``⌊level·(T-1)⌉`` of frames ``1..T-1`` are replaced by the last kept frame before them (a stalled
  stream; frame 0 is always kept, so level 1 is a still image);
* ``blur``: every frame blurred as the image ``blur`` corruption (Gaussian, std ``0.1·level·image_size`` pixels).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from mmssl.architectures.embedders import EmbeddedTokens, TokenEmbedder, learned_positions
from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.modalities import corruptions
from mmssl.architectures.modalities.base import (
    MLP_RATIO,
    DecoderFn,
    MaskedView,
    ModalityPlugin,
    TowerConfig,
    timm_tower,
)
from mmssl.architectures.modalities.image import pixel_corruption, vit_masked_view
from mmssl.architectures.modalities.masking import Generators, tube_mask, tubeletify
from mmssl.architectures.modalities.video_cnn import VIDEO_RESNETS, VideoCNNTower
from mmssl.architectures.towers import Tower, TowerOutput, prefixed_matcher

TEMPORAL_FILE = "temporal.safetensors"
NPY_MAGIC = b"\x93NUMPY"
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's "L" conversion


@dataclass
class VideoConfig(TowerConfig):
    arch: str = "vit_tiny_patch16_224"
    image_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    frames: int = 8
    tubelet: int = 2  # frames per tubelet (token embedder, masking, target)
    temporal_depth: int = 1
    temporal_heads: int | None = None  # default: heads, else the frame ViT's
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])


def frame_indices(available: int, frames: int, offset: float) -> np.ndarray:
    """``min(n - 1, ⌊(i + offset)·n / frames⌋)`` for ``i < frames`` (module docstring)."""
    if available < 1:
        raise ValueError("the video has no frames")
    i = np.arange(frames, dtype=np.float64)
    return np.minimum(np.floor((i + offset) * available / frames).astype(np.int64), available - 1)


def _to_unit_float(arr: np.ndarray) -> np.ndarray:
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32)
    raise ValueError(f"unsupported video array dtype {arr.dtype}")


def _match_channels(frames: np.ndarray, channels: int) -> np.ndarray:
    """``[T, H, W, C]`` -> ``[T, H, W, channels]``: alpha dropped, grey repeated, RGB to luma."""
    c = frames.shape[-1]
    if c == 4:
        frames, c = frames[..., :3], 3
    if c == channels:
        return frames
    if c == 1 and channels == 3:
        return np.repeat(frames, 3, axis=-1)
    if c == 3 and channels == 1:
        return (frames @ np.asarray(LUMA, dtype=frames.dtype))[..., None]
    raise ArchitectureError(f"video frames have {c} channels; model.video.in_chans={channels}")


def read_frames(data: bytes, frames: int, offset: float, channels: int) -> np.ndarray:
    """The sampled frames of a ``.npy`` array or a multi-frame image, float32 ``[frames, H, W, channels]``."""
    if data[: len(NPY_MAGIC)] == NPY_MAGIC:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4:
            raise ValueError(f"a video array must be [T, H, W, C] or [T, H, W], got shape {list(arr.shape)}")
        picked = _to_unit_float(arr[frame_indices(arr.shape[0], frames, offset)])
        return _match_channels(picked, channels)
    mode = "L" if channels == 1 else "RGB"
    with Image.open(io.BytesIO(data)) as img:
        out: list[np.ndarray] = []
        for k in frame_indices(int(getattr(img, "n_frames", 1)), frames, offset).tolist():
            img.seek(k)
            out.append(np.asarray(img.convert(mode), dtype=np.float32) / 255.0)
    stacked = np.stack(out)
    return stacked[..., None] if stacked.ndim == 3 else stacked


FrameCorruption = Callable[[Tensor, np.random.Generator], Tensor]


class VideoDecoder:
    """Bytes -> ``[C, T, H, W]``; ``corrupt`` (evaluation corruptions) acts on the resized ``[0, 1]`` frames
    ``[T, C, H, W]`` before normalisation."""

    def __init__(self, cfg: VideoConfig, train: bool, corrupt: FrameCorruption | None = None) -> None:
        self.cfg, self.train, self.corrupt = cfg, train, corrupt
        c = cfg.in_chans
        self.mean = torch.tensor((cfg.mean * c)[:c], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor((cfg.std * c)[:c], dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, data: bytes, rng: np.random.Generator) -> Tensor:
        cfg = self.cfg
        offset = float(rng.random()) if self.train else 0.5
        frames = torch.from_numpy(np.ascontiguousarray(read_frames(data, cfg.frames, offset, cfg.in_chans)))
        x = TF.resize(frames.permute(0, 3, 1, 2), [cfg.image_size, cfg.image_size], antialias=True)
        if self.corrupt is not None:
            x = self.corrupt(x, rng)
        return ((x - self.mean) / self.std).transpose(0, 1).contiguous()  # [C, T, H, W]


class TubeletEmbedder(TokenEmbedder):
    """ViViT tubelet embedding with factorised learned positions (module docstring)."""

    def __init__(self, in_chans: int, frames: int, size: tuple[int, int], tubelet: int, patch: tuple[int, int],
                 width: int) -> None:
        super().__init__()
        if frames % tubelet:
            raise ArchitectureError(f"model.video.frames={frames} is not divisible by model.video.tubelet={tubelet}")
        if size[0] % patch[0] or size[1] % patch[1]:
            raise ArchitectureError(f"video frame size {list(size)} is not divisible by patch size {list(patch)}")
        self.in_chans, self.frames, self.size, self.width = in_chans, frames, tuple(size), width
        self.tubelet, self.patch = tubelet, tuple(patch)
        self.grid = (frames // tubelet, size[0] // patch[0], size[1] // patch[1])
        self.max_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        kernel = (tubelet, *self.patch)
        self.proj = nn.Conv3d(in_chans, width, kernel_size=kernel, stride=kernel)
        self.pos_embed = learned_positions(self.grid[1] * self.grid[2], width)  # spatial
        self.temporal_embed = learned_positions(self.grid[0], width)

    def forward(self, x: Tensor) -> EmbeddedTokens:
        expected = (self.in_chans, self.frames, *self.size)
        if tuple(x.shape[1:]) != expected:
            raise ArchitectureError(f"tubelet embedder expects [B, {', '.join(map(str, expected))}], "
                                    f"got {list(x.shape)}")
        tokens = self.proj(x).flatten(3).permute(0, 2, 3, 1)  # [B, G, S, width]
        tokens = tokens + self.pos_embed.unsqueeze(1) + self.temporal_embed.unsqueeze(2)
        tokens = tokens.flatten(1, 2)
        return EmbeddedTokens(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "temporal_embed"}


def _frame_heads(frame: Tower) -> int:
    """The attention heads of a timm ViT frame model's blocks (0 for other models)."""
    blocks = getattr(getattr(frame, "model", None), "blocks", None)
    return int(getattr(blocks[0].attn, "num_heads", 0)) if blocks else 0


class VideoTower(Tower):
    """Per-frame timm model + temporal transformer (module docstring). ``pretrained``: the frame model's weights
    (a directory or ``.safetensors`` file); a directory written by `save_native` also restores the temporal part."""

    def __init__(self, cfg: VideoConfig) -> None:
        super().__init__()
        size = [cfg.image_size, cfg.image_size]
        self.frame = timm_tower(cfg, in_chans=cfg.in_chans, img_size=size, patch_size=cfg.patch_size,
                                where="model.video")
        dim = self.num_features = self.frame.num_features
        heads = cfg.temporal_heads or cfg.heads or _frame_heads(self.frame)
        if heads < 1 or dim % heads:
            raise ArchitectureError(f"model.video.temporal_heads={heads} (default: heads, else the frame ViT's) must "
                                    f"divide the frame feature width {dim} of {cfg.arch!r}")
        self.max_frames, self.tubelet = cfg.frames, cfg.tubelet
        self.temporal_embed = learned_positions(cfg.frames, dim)
        self.temporal_blocks = nn.Sequential(*(
            Block(dim, heads, mlp_ratio=cfg.mlp_ratio or MLP_RATIO, qkv_bias=True, proj_drop=cfg.dropout,
                  attn_drop=cfg.dropout, drop_path=cfg.drop_path) for _ in range(cfg.temporal_depth)))
        self.temporal_norm = nn.LayerNorm(dim, eps=1e-6)
        self.grad_checkpointing = False
        if cfg.pretrained and (Path(cfg.pretrained) / TEMPORAL_FILE).is_file():
            self._load_temporal(Path(cfg.pretrained) / TEMPORAL_FILE)

    def _temporal_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("frame.")}

    def _load_temporal(self, path: Path) -> None:
        state = load_file(str(path))
        expected = set(self._temporal_state())
        if set(state) != expected:
            raise ArchitectureError(f"{path} does not match model.video's temporal transformer (missing "
                                    f"{sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)})")
        self.load_state_dict(state, strict=False)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 5 or x.shape[2] > self.max_frames:
            raise ArchitectureError(f"video tower expects [B, C, T <= {self.max_frames}, H, W], got {list(x.shape)}")

    def _temporal(self, pooled: Tensor) -> Tensor:
        """``[B, T, D]`` frame features -> ``LN(Blocks(f + e))`` (module docstring)."""
        h = pooled + self.temporal_embed[:, : pooled.shape[1]]
        if self.grad_checkpointing and torch.is_grad_enabled():
            from timm.models import checkpoint_seq

            h = checkpoint_seq(self.temporal_blocks, h)
        else:
            h = self.temporal_blocks(h)
        return self.temporal_norm(h)

    def forward_features(self, x: Tensor) -> Tensor:
        self._check(x)
        b, t = x.shape[0], x.shape[2]
        return self._temporal(self.frame(x.transpose(1, 2).flatten(0, 1)).pooled.view(b, t, -1))

    def forward_head(self, x: Tensor, pre_logits: bool = True, **kwargs: Any) -> Tensor:
        return x.mean(1)

    def forward(self, x: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None,
                visible: int | None = None) -> TowerOutput:
        """Without ``mask``: the plain forward. With ``mask`` (``bool[B, G·gh·gw]`` over the tubelet tokens): the
        masked view of the module docstring under the towers' masked-forward contract (`Tower.forward`); features
        ``[B, T + G·gh·gw or T + visible, D]``, the ``T`` frame states first; pooled: their mean."""
        if mask is None:
            features = self.forward_features(x)
            return TowerOutput(features, self.forward_head(features))
        features = self._forward_masked(x, mask, mask_token, visible)
        return TowerOutput(features, self.forward_head(features[:, : x.shape[2]]))

    def encodes_masked_views(self) -> bool:
        return self.frame.encodes_masked_views()

    def _forward_masked(self, x: Tensor, mask: Tensor, mask_token: Tensor | None, visible: int | None) -> Tensor:
        self._check(x)
        if not self.encodes_masked_views():
            raise ArchitectureError(f"model.video.arch={self.frame.arch!r}: a masked video view needs a ViT frame "
                                    "model (e.g. vit_tiny_patch16_224)")
        b, t = x.shape[0], x.shape[2]
        if t % self.tubelet:
            raise ArchitectureError(f"a masked video view needs whole tubelets: {t} frames, "
                                    f"model.video.tubelet={self.tubelet}")
        groups = t // self.tubelet
        if mask.ndim != 2 or mask.shape[0] != b or mask.shape[1] % groups:
            raise ArchitectureError(f"video mask shape {list(mask.shape)} is not [{b}, {groups} groups x patches]")
        spatial = mask.shape[1] // groups
        frame_mask = mask.view(b, groups, 1, spatial).expand(b, groups, self.tubelet, spatial).reshape(b * t, spatial)
        if visible is not None:
            if visible % groups:
                raise ArchitectureError(f"dropping masked tubelets keeps the same patches in every frame group (a tube "
                                        f"mask): visible={visible} is not a multiple of the {groups} groups")
            visible //= groups
        out = self.frame(x.transpose(1, 2).flatten(0, 1), mask=frame_mask, mask_token=mask_token, visible=visible)
        patches = out.features[:, self.frame.num_prefix_tokens :]
        patches = patches.reshape(b, groups, self.tubelet, patches.shape[1], -1).mean(2).flatten(1, 2)
        return torch.cat([self._temporal(out.pooled.view(b, t, -1)), patches], dim=1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.frame.set_grad_checkpointing(enable)
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {f"frame.{n}" for n in self.frame.no_weight_decay()} | {"temporal_embed"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The frame model's groups (``frame.`` prefixed), then the temporal transformer, block by block."""
        frame = prefixed_matcher("frame.", self.frame.group_matcher(coarse))
        blocks = frame.get("blocks", [])
        blocks = [(blocks, None)] if isinstance(blocks, str) else list(blocks)
        depth = len(self.temporal_blocks)
        blocks += [(r"^temporal_embed", (100000,))]
        blocks += [(rf"^temporal_blocks\.{i}\.", (100000 + i,)) for i in range(depth)]
        blocks += [(r"^temporal_norm", (100000 + depth,))]
        return {"stem": frame.get("stem", r"^frame\.model\.(conv|patch_embed|stem)"), "blocks": blocks}

    def save_native(self, out_dir: Path, extra: dict[str, Any]) -> None:
        """The frame model in timm's format (``timm.create_model("local-dir:DIR")`` rebuilds it) plus
        ``temporal.safetensors`` (temporal embedding, blocks and norm)."""
        self.frame.save_native(out_dir, extra)
        state = {k: v.detach().cpu().contiguous() for k, v in self._temporal_state().items()}
        save_file(state, str(Path(out_dir) / TEMPORAL_FILE))


class VideoPlugin(ModalityPlugin):
    name = "video"
    config_cls = VideoConfig
    extensions = ("gif", "webp", "npy")
    corruptions = ("frame_drop", "blur")

    def decoder(self, cfg: VideoConfig, *, train: bool) -> DecoderFn:
        return VideoDecoder(cfg, train)

    def build_corrupted_decoder(self, cfg: VideoConfig, kind: str, level: float) -> VideoDecoder:
        """The evaluation decoder with ``kind`` at ``level`` applied to the resized frames (module docstring)."""
        if kind == "frame_drop":
            corrupt: FrameCorruption = corruptions.Bound(corruptions.drop_frames, level)
        else:
            corrupt = pixel_corruption("blur", level, cfg.image_size, torch.zeros(cfg.in_chans))
        return VideoDecoder(cfg, train=False, corrupt=corrupt)

    def build_tower(self, cfg: VideoConfig) -> Tower:
        """`VideoTower` (a timm frame model + temporal transformer), or for ``arch`` in `VIDEO_RESNETS` a 3-D CNN
        over the whole clip (`VideoCNNTower`: R(2+1)D-18, R3D-18, MC3-18)."""
        if cfg.arch in VIDEO_RESNETS:
            return VideoCNNTower(cfg.arch, in_chans=cfg.in_chans, pretrained=cfg.pretrained)
        return VideoTower(cfg)

    def build_embedder(self, cfg: VideoConfig, width: int) -> TubeletEmbedder:
        size, patch = (cfg.image_size, cfg.image_size), (cfg.patch_size, cfg.patch_size)
        return TubeletEmbedder(cfg.in_chans, cfg.frames, size, cfg.tubelet, patch, width)

    def mask_kinds(self, cfg: VideoConfig) -> tuple[str, ...]:
        return ("tube",)

    def mask(self, cfg: VideoConfig, x: Tensor, ratio: float, generator: Generators = None, *,
             kind: str | None = None, span_length: int = 1) -> Tensor:
        """``tube``: tube masking over the tubelet tokens, ``bool[B, G·gh·gw]``, the same ``⌊ratio·gh·gw + ½⌋``
        spatial positions in every group (VideoMAE)."""
        self.check_mask_kind(cfg, kind)
        groups = x.shape[2] // cfg.tubelet
        spatial = (x.shape[3] // cfg.patch_size) * (x.shape[4] // cfg.patch_size)
        return tube_mask(x.shape[0], groups, spatial, ratio, generator, device=x.device)

    def target(self, cfg: VideoConfig, x: Tensor) -> Tensor:
        """The tubelets' pixels ``[B, G·gh·gw, tubelet·ph·pw·C]`` (`tubeletify`, the embedder's token order)."""
        return tubeletify(x, cfg.tubelet, (cfg.patch_size, cfg.patch_size))

    def masked_view(self, cfg: VideoConfig, tower: Tower) -> MaskedView | None:
        """`VideoTower` over ViT frames encodes the ``(frames/tubelet, size/p, size/p)`` tubelet grid."""
        if not isinstance(tower, VideoTower):
            return None
        p = cfg.patch_size
        if vit_masked_view("video", tower.frame, (cfg.in_chans, p, p), (cfg.image_size // p,) * 2) is None:
            return None
        if cfg.frames % cfg.tubelet:
            raise ArchitectureError(f"model.video.frames={cfg.frames} is not divisible by model.video.tubelet="
                                    f"{cfg.tubelet}")
        return MaskedView((cfg.frames // cfg.tubelet, cfg.image_size // p, cfg.image_size // p),
                          cfg.tubelet * p * p * cfg.in_chans)

    def random_example(self, cfg: VideoConfig, batch_size: int) -> Tensor:
        return torch.randn(batch_size, cfg.in_chans, cfg.frames, cfg.image_size, cfg.image_size)

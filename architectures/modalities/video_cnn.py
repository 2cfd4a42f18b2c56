"""3-D convolutional video towers from torchvision's ``VideoResNet``: R(2+1)D-18, R3D-18, MC3-18 (Tran et al. 2018,
"A Closer Look at Spatiotemporal Convolutions for Action Recognition").

Input ``[B, C, T, H, W]`` (the video plug-in's decoded clip). ``forward_features`` is the last stage's feature map
``[B, 512, t, h, w]`` flattened to ``t·h·w`` tokens ``[B, t·h·w, 512]``; ``forward_head`` their mean (global average
pooling). The classifier is removed.

R(2+1)D factorises every ``3x3x3`` convolution ``N_{i-1} -> N_i`` into a ``1x3x3`` spatial convolution to ``M_i``
channels, BatchNorm, ReLU and a ``3x1x1`` temporal convolution, with (§3.5, the 3-D convolution's parameter count
kept)::

    M_i = ⌊ t·d²·N_{i-1}·N_i / (d²·N_{i-1} + t·N_i) ⌋,      t = d = 3

Each convolution computes ``M_i`` from its own ``N_{i-1}, N_i``, as the authors' VMZ code and XDC's released models
do (33.2 M parameters without the classifier; torchvision's ``r2plus1d_18`` reuses the block's first ``M_i`` for its
second convolution and has 31.3 M). R3D is the plain ``3x3x3`` network; MC3 uses 3-D convolutions in the first stage
only (mixed convolutions).

`save_native` writes ``model.safetensors`` (torchvision's ``VideoResNet`` keys) and ``config.json``
(``{"library": "torchvision", "architecture": ...}``): `build_video_resnet` plus ``load_state_dict`` rebuild it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torchvision.models.video.resnet import (
    BasicBlock,
    BasicStem,
    Conv3DNoTemporal,
    Conv3DSimple,
    R2Plus1dStem,
    VideoResNet,
)

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.towers import Tower, load_state


def factorised_mid_channels(in_planes: int, out_planes: int, t: int = 3, d: int = 3) -> int:
    """``M_i`` of the module docstring."""
    return (t * d * d * in_planes * out_planes) // (d * d * in_planes + t * out_planes)


class FactorisedConv3d(nn.Sequential):
    """R(2+1)D's ``1x3x3`` spatial + ``3x1x1`` temporal convolution pair, ``M_i`` from its own channel counts (the
    ``midplanes`` torchvision's block passes is ignored)."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: int | None = None, stride: int = 1,
                 padding: int = 1) -> None:
        mid = factorised_mid_channels(in_planes, out_planes)
        super().__init__(
            nn.Conv3d(in_planes, mid, kernel_size=(1, 3, 3), stride=(1, stride, stride), padding=(0, padding, padding),
                      bias=False),
            nn.BatchNorm3d(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, out_planes, kernel_size=(3, 1, 1), stride=(stride, 1, 1), padding=(padding, 0, 0),
                      bias=False),
        )

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        return stride, stride, stride


VIDEO_RESNETS: dict[str, tuple[type[nn.Module], list[type[nn.Module]]]] = {
    "r2plus1d_18": (R2Plus1dStem, [FactorisedConv3d] * 4),
    "r3d_18": (BasicStem, [Conv3DSimple] * 4),
    "mc3_18": (BasicStem, [Conv3DSimple] + [Conv3DNoTemporal] * 3),
}


def build_video_resnet(arch: str) -> VideoResNet:
    """torchvision's ``VideoResNet`` of ``arch`` (``VIDEO_RESNETS``), [2, 2, 2, 2] basic blocks, classifier removed."""
    if arch not in VIDEO_RESNETS:
        raise ArchitectureError(f"unknown video CNN {arch!r}; choose one of {sorted(VIDEO_RESNETS)}")
    stem, convs = VIDEO_RESNETS[arch]
    model = VideoResNet(BasicBlock, convs, [2, 2, 2, 2], stem)
    model.fc = nn.Identity()
    return model


class VideoCNNTower(Tower):
    """A torchvision ``VideoResNet`` with timm's tower contract (module docstring). ``pretrained``: a
    ``.safetensors`` file (or a directory written by `save_native`) with ``VideoResNet`` keys."""

    def __init__(self, arch: str, *, in_chans: int = 3, pretrained: str | None = None) -> None:
        super().__init__()
        if in_chans != 3:
            raise ArchitectureError(f"model.video.in_chans={in_chans}: the torchvision video CNNs take 3 channels")
        self.arch = arch
        self.model = build_video_resnet(arch)
        self.num_features = 512
        self.grad_checkpointing = False
        self.source: str | None = None
        if pretrained and torch.empty(0).device.type != "meta":
            state = load_state(pretrained)
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ArchitectureError(f"{pretrained} does not match {arch} (missing {missing[:3]}, unexpected "
                                        f"{unexpected[:3]})")
            self.source = str(Path(pretrained).resolve())

    def forward_features(self, x: Tensor) -> Tensor:
        if x.ndim != 5:
            raise ArchitectureError(f"video tower {self.arch!r} expects [B, C, T, H, W], got {list(x.shape)}")
        h = self.model.stem(x)
        for layer in (self.model.layer1, self.model.layer2, self.model.layer3, self.model.layer4):
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False)
            else:
                h = layer(h)
        return h.flatten(2).transpose(1, 2)

    def forward_head(self, x: Tensor, pre_logits: bool = True, **kwargs: Any) -> Tensor:
        return x.mean(1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^model\.stem", "blocks": r"^model\.layer(\d+)" if coarse else r"^model\.layer(\d+)\.(\d+)"}

    def save_native(self, out_dir: Path, extra: dict[str, Any]) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                  str(out / "model.safetensors"))
        config = {"library": "torchvision", "architecture": self.arch, "num_features": self.num_features,
                  "mmssl": extra}
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

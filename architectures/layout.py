"""Channels-last memory layout for convolutional towers (``train.channels_last``).

A 4-D input ``[B, C, H, W]`` (images, spectrograms) handed to a convolution with channels-last strides
``(H·W·C, 1, W·C, C)`` makes PyTorch run the convolution, and every layer after it that keeps the layout
(batch norm, activations, pooling), in NHWC: oneDNN's NHWC kernels on the CPU, cuDNN's on a GPU (not measured
here: no GPU has been lent).
Weights keep their layout (DeepSpeed flattens them into its own buffers anyway); the convolutions take the input's.
The same values in another order of floating point operations: features differ from the NCHW pass by rounding.

Measured on a 2-core AVX-512 Xeon with torch 2.14 (``mmssl bench layout``, docs/performance.md): ResNets 1.1-1.4x
per forward + backward (ResNet-18 on 64 px images in fp32: 0.87x), EfficientNet-Lite0 1.6-1.8x per frozen forward,
ConvNeXt and ViTs (one convolution, the patch embedding) unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def to_channels_last(x: Tensor) -> Tensor:
    """``x`` with channels-last strides when it is 4-D (a copy unless it has them already), else ``x``.

    For ``C = 1`` ``x.contiguous(memory_format=torch.channels_last)`` returns ``x`` itself (its NCHW strides fit
    both layouts) and the convolution then runs NCHW; the explicit strides (channel stride 1) make it run NHWC."""
    if x.dim() != 4 or (x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)


def convolutional(tower: nn.Module) -> bool:
    """A tower with more than one 2-D convolution (a CNN, a hybrid ViT); a ViT's patch embedding alone is not."""
    return sum(isinstance(m, nn.Conv2d) for m in tower.modules()) > 1


def use_channels_last(model: nn.Module, enable: bool | None) -> list[str]:
    """Set every timm tower of ``model`` (stitched models' frozen vision towers included) to take its input in
    channels-last layout: ``enable`` None (``auto``) the `convolutional` ones, True all, False none. Returns the
    names of the towers switched on (``""`` for ``model`` itself)."""
    from mmssl.architectures.towers import TimmTower  # towers import this module

    names = []
    for name, module in model.named_modules():
        if isinstance(module, TimmTower):
            module.channels_last = bool(convolutional(module) if enable is None else enable)
            if module.channels_last:
                names.append(name)
    return names

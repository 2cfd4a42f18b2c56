"""Channels-last inputs for convolutional towers (`architectures.layout`, ``train.channels_last``): the layout the
convolutions receive, which towers ``auto`` switches, and that the features and gradients are the NCHW pass's up to
rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmssl.architectures.layout import convolutional, to_channels_last, use_channels_last
from mmssl.architectures.towers import TimmTower

RESNET = {"in_chans": 1, "channels": [8, 16, 32, 64]}
VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "in_chans": 1}


@pytest.mark.parametrize("channels", [1, 3])
def test_to_channels_last_gives_channel_stride_one_and_the_same_values(channels: int) -> None:
    x = torch.randn(2, channels, 5, 7)
    y = to_channels_last(x)
    assert y.stride() == (5 * 7 * channels, 1, 7 * channels, channels) and torch.equal(x, y)
    assert y.data_ptr() != x.data_ptr()  # for C = 1 too, where contiguous(memory_format=...) returns x itself
    assert to_channels_last(y) is y
    for other in (torch.randn(2, 3, 4), torch.randn(1, 2, 3, 4, 5)):
        assert to_channels_last(other) is other


def test_auto_switches_convolutional_towers_only() -> None:
    towers = nn.ModuleDict({"audio": TimmTower("resnet10t", RESNET), "image": TimmTower("vit_tiny_patch16_224", VIT),
                            "stitched": nn.ModuleDict({"vision": TimmTower("efficientnet_lite0", {})})})
    assert convolutional(towers["audio"]) and not convolutional(towers["image"])
    assert use_channels_last(towers, None) == ["audio", "stitched.vision"]
    assert towers["audio"].channels_last and not towers["image"].channels_last
    assert use_channels_last(towers, True) == ["audio", "image", "stitched.vision"]
    assert use_channels_last(towers, False) == [] and not towers["audio"].channels_last


def test_a_channels_last_tower_convolves_nhwc_and_matches_the_nchw_pass() -> None:
    """A ResNet over ``[B, 1, F, T]`` spectrograms: with the switch its first convolution receives channel-stride-1
    input and returns an NHWC map (without it, NCHW); features and every gradient equal the NCHW pass's within
    fp32 rounding, and both are as close to a float64 pass (each tensor's largest error relative to its largest
    gradient; measured NCHW 4.3e-06, NHWC 6.1e-06)."""
    torch.manual_seed(0)
    tower = TimmTower("resnet10t", RESNET)
    x = torch.randn(4, 1, 32, 48)
    seen: list[tuple[bool, bool]] = []
    first = next(m for m in tower.modules() if isinstance(m, nn.Conv2d))
    first.register_forward_hook(lambda _, args, out: seen.append(
        (args[0].stride(1) == 1, out.is_contiguous(memory_format=torch.channels_last))))
    results = {}
    for enable in (False, True):
        use_channels_last(tower, enable)
        tower.zero_grad(set_to_none=True)
        out = tower(x)
        out.pooled.square().sum().backward()
        results[enable] = (out.pooled.detach(), {n: p.grad.clone() for n, p in tower.named_parameters()})
    assert seen == [(False, False), (True, True)]
    reference = TimmTower("resnet10t", RESNET).double()
    reference.load_state_dict(tower.state_dict())
    reference(x.double()).pooled.square().sum().backward()
    error = {enable: max(float((grads[n].double() - p.grad).abs().max() / p.grad.abs().max())
                         for n, p in reference.named_parameters()) for enable, (_, grads) in results.items()}
    print(f"largest gradient error against float64: NCHW {error[False]:.1e}, NHWC {error[True]:.1e}")
    assert error[True] < 4 * error[False] + 1e-6 and error[False] < 4 * error[True] + 1e-6
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-4, atol=1e-5)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-3, atol=1e-4, msg=name)


def test_a_vit_switched_on_encodes_masked_views_in_channels_last_too() -> None:
    """``true`` switches a ViT as well: its masked forward (MAE's drop mode) sees the NHWC input at the patch
    embedding and gives the NCHW pass's tokens within fp32 rounding."""
    torch.manual_seed(0)
    vit = TimmTower("vit_tiny_patch16_224", {**VIT, "in_chans": 3})
    x, mask = torch.randn(2, 3, 32, 32), torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::2] = True
    seen: list[bool] = []
    vit.model.patch_embed.proj.register_forward_hook(lambda _, args, out: seen.append(args[0].stride(1) == 1))
    out = {}
    for enable in (False, True):
        use_channels_last(vit, enable)
        with torch.no_grad():
            out[enable] = vit(x, mask=mask, visible=8).features
    assert seen == [False, True] and out[True].shape == (2, 9, 32)
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-5)

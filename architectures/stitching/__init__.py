"""Frozen pretrained vision and language models stitched by a small trainable bridge (``model.family: stitched``).

* `bridges`: the bridge contract, `LinearBridge` / `MLPBridge` (Frozen, LiMBeR), `PrefixMapper` (ClipCap), and
  `build_bridge` by kind name;
* `qformer`: `QFormer` (BLIP-2); `flamingo`: `FlamingoBridge` (a Perceiver resampler and gated cross-attention
  blocks, built from `architectures.layers`);
* `lm`: `FrozenLM`, a frozen transformers encoder or causal LM; `model`: `StitchedModel`;
* `pretrained`: local pretrained weights (EfficientNet-Lite0 converted to safetensors, MiniLM) and `sha256_file`.
"""

from __future__ import annotations

from mmssl.architectures.stitching.bridges import (
    Bridge,
    BridgeOutput,
    LinearBridge,
    MLPBridge,
    PrefixMapper,
    build_bridge,
)
from mmssl.architectures.stitching.flamingo import FlamingoBridge
from mmssl.architectures.stitching.lm import FrozenLM
from mmssl.architectures.stitching.model import StitchedModel
from mmssl.architectures.stitching.qformer import QFormer

__all__ = [
    "Bridge",
    "BridgeOutput",
    "FlamingoBridge",
    "FrozenLM",
    "LinearBridge",
    "MLPBridge",
    "PrefixMapper",
    "QFormer",
    "StitchedModel",
    "build_bridge",
]

"""The building blocks every transformer of mmssl is made of, each written once.

* `attention`: `Attention`, multi-head scaled dot-product attention with one mask convention (True = may attend;
  a query row with no key gets a zero update), self- or cross-attention, causal or any boolean pattern;
* `blocks`: `Block`, the pre-norm block (self-attention, cross-attention, MLP; gates, modality experts, DropPath)
  and `init_vit_weights`;
* `perceiver`: `Perceiver`, the latent bottleneck of HighMMT and Flamingo's resampler;
* `legacy`: `PARAM_LAYOUT` and `upgrade_state_dict`, which converts exported models of the older layout.
"""

from __future__ import annotations

from mmssl.architectures.layers.attention import Attention, attention_mask
from mmssl.architectures.layers.blocks import Block, Route, init_vit_weights
from mmssl.architectures.layers.legacy import PARAM_LAYOUT, upgrade_state_dict
from mmssl.architectures.layers.perceiver import Perceiver

__all__ = ["PARAM_LAYOUT", "Attention", "Block", "Perceiver", "Route", "attention_mask", "init_vit_weights",
           "upgrade_state_dict"]

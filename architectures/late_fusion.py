"""Late fusion (ALBEF / FLAVA style): the towers of a fusion-free model, then a fusion module over their tokens.

``forward`` returns the fusion-free outputs plus ``fused[query]``: the query modality's tokens fused with every
other modality given in the batch. ``fuse`` is the same fusion on any token set, which matching and cross-modal
masked objectives call on negative pairs and masked views.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from architectures.fusion import CrossAttentionFusion
from architectures.fusion_free import FusionFreeModel
from architectures.outputs import ModelOutput, tower_name
from architectures.towers import Tower


class LateFusionModel(FusionFreeModel):
    family = "late_fusion"

    def __init__(self, towers: Mapping[str, Tower], heads: Mapping[str, nn.Module], fusion: CrossAttentionFusion,
                 query: str) -> None:
        super().__init__(towers, heads)
        self.fusion = fusion
        self.query = query

    def forward(self, inputs: Mapping[str, Any], present: Mapping[str, Tensor] | None = None) -> ModelOutput:
        out = self.encode_towers(inputs, present)
        plain = [m for m in out.tokens if tower_name(m) == m]  # views are not fused
        if self.query in plain and len(plain) > 1:
            out.fused[self.query] = self.fusion({m: out.tokens[m] for m in plain},
                                                {m: out.token_mask[m] for m in plain}, self.query)
        return out

    def fuse(self, tokens: Mapping[str, Tensor], token_mask: Mapping[str, Tensor], query: str) -> Tensor:
        return self.fusion(tokens, token_mask, query)

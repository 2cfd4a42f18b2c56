"""Late fusion (ALBEF / FLAVA style): the towers of a fusion-free model, then a fusion module over their tokens.

The fusion module is any of `architectures.fusion_ops.OPERATOR_FUSIONS` (``model.fusion.kind``): cross-attention
(the default), merged attention (one transformer over all modalities' tokens: FLAVA, CAV-MAE), MulT, or a vector
fusion (concat/MLP, tensor, low-rank, gated, multiplicative) whose fused output is one token.

``forward`` returns the fusion-free outputs plus ``fused[query]``: the query modality's tokens fused with every
other modality given in the batch. ``fuse`` is the same fusion on any token set, which matching and cross-modal
masked objectives call on negative pairs and masked views; ``fuse_joint`` gives every modality's fused states at
once (merged attention only), which joint masked autoencoding (``joint_mae``) decodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.fusion_free import FusionFreeModel
from mmssl.architectures.outputs import ModelOutput, tower_name
from mmssl.architectures.towers import Tower


class LateFusionModel(FusionFreeModel):
    family = "late_fusion"

    def __init__(self, towers: Mapping[str, Tower], heads: Mapping[str, nn.Module], fusion: nn.Module,
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

    def fuse_joint(self, tokens: Mapping[str, Tensor], token_mask: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every modality's fused states at once, for fusion operators that have them (``merged``)."""
        joint = getattr(self.fusion, "joint", None)
        if joint is None:
            raise ArchitectureError(f"the fusion operator {type(self.fusion).__name__} gives only the query's fused "
                                    "states; joint states (joint_mae) need model.fusion.kind: merged")
        return joint(tokens, token_mask)

    def no_weight_decay(self) -> set[str]:
        names = super().no_weight_decay()
        return names | {f"fusion.{n}" for n in getattr(self.fusion, "no_weight_decay", set)()}

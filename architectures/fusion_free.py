"""Fusion-free (CLIP / ALIGN / MMV style) model: one tower and one projection head per modality, no fusion.

``forward(inputs, present)`` encodes exactly the modalities in ``inputs`` (ImageBind style: a modality that is not
given costs nothing) and returns a `ModelOutput`. A second augmented view ``"<m>@1"`` is encoded by the tower of
``m``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from architectures.outputs import ModelOutput, ModelSpec, tower_name
from architectures.towers import ArchitectureError, Tower


def as_tokens(features: Tensor) -> Tensor:
    """``[B, T, D]`` token states; a CNN feature map ``[B, C, H, W]`` becomes ``[B, H·W, C]``."""
    if features.ndim == 4:
        return features.flatten(2).transpose(1, 2)
    if features.ndim == 2:
        return features.unsqueeze(1)
    return features


class FusionFreeModel(nn.Module):
    family = "fusion_free"

    def __init__(self, towers: Mapping[str, Tower], heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if set(towers) != set(heads):
            raise ArchitectureError(f"towers {sorted(towers)} and heads {sorted(heads)} name different modalities")
        self.towers = nn.ModuleDict(dict(towers))
        self.heads = nn.ModuleDict(dict(heads))
        self.spec: ModelSpec | None = None  # set by build_model

    @property
    def modalities(self) -> list[str]:
        return list(self.towers)

    def encode_towers(self, inputs: Mapping[str, Any], present: Mapping[str, Tensor] | None) -> ModelOutput:
        unknown = sorted(m for m in inputs if tower_name(m) not in self.towers)
        if unknown:
            raise ArchitectureError(f"the model has no tower for modality {unknown[0]!r} (towers: {self.modalities})")
        out = ModelOutput(embeddings={}, pooled={}, tokens={}, present={})
        for m, x in inputs.items():
            name = tower_name(m)
            features, pooled = self.towers[name](x)
            tokens = as_tokens(features)
            out.tokens[m], out.pooled[m] = tokens, pooled
            out.embeddings[m] = self.heads[name](pooled)
            batch = pooled.shape[0]
            if isinstance(x, Mapping) and "attention_mask" in x and x["attention_mask"].shape[1] == tokens.shape[1]:
                out.token_mask[m] = x["attention_mask"].bool()
            else:
                out.token_mask[m] = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            mask = present.get(m) if present is not None else None
            out.present[m] = mask if mask is not None else torch.ones(batch, dtype=torch.bool, device=pooled.device)
        return out

    def forward(self, inputs: Mapping[str, Any], present: Mapping[str, Tensor] | None = None) -> ModelOutput:
        return self.encode_towers(inputs, present)

    def fuse(self, tokens: Mapping[str, Tensor], token_mask: Mapping[str, Tensor], query: str) -> Tensor:
        raise ArchitectureError(f"model.family={self.family!r} has no fusion module")

    def encode(self, modality: str, x: Any) -> Tensor:
        """The projected embedding of one modality."""
        return self.forward({modality: x}).embeddings[modality]

    # timm-style contract, delegated to the towers ------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for tower in self.towers.values():
            tower.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {f"towers.{m}.{n}" for m, t in self.towers.items() for n in t.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> dict[str, dict[str, Any]]:
        return {m: t.group_matcher(coarse) for m, t in self.towers.items()}

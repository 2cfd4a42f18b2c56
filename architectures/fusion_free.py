"""Fusion-free (CLIP / ALIGN / MMV style) model: one tower and one projection head per modality, no fusion.

``forward(inputs, present)`` encodes exactly the modalities in ``inputs`` (ImageBind style: a modality that is not
given costs nothing) and returns a `ModelOutput`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from architectures.outputs import ModelOutput
from architectures.towers import ArchitectureError, Tower


class FusionFreeModel(nn.Module):
    def __init__(self, towers: Mapping[str, Tower], heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if set(towers) != set(heads):
            raise ArchitectureError(f"towers {sorted(towers)} and heads {sorted(heads)} name different modalities")
        self.towers = nn.ModuleDict(dict(towers))
        self.heads = nn.ModuleDict(dict(heads))

    @property
    def modalities(self) -> list[str]:
        return list(self.towers)

    def forward(self, inputs: Mapping[str, Any], present: Mapping[str, Tensor] | None = None) -> ModelOutput:
        unknown = sorted(set(inputs) - set(self.towers))
        if unknown:
            raise ArchitectureError(f"the model has no tower for modality {unknown[0]!r} (towers: {self.modalities})")
        out = ModelOutput(embeddings={}, pooled={}, tokens={}, present={})
        for m, x in inputs.items():
            tokens, pooled = self.towers[m](x)
            out.tokens[m], out.pooled[m] = tokens, pooled
            out.embeddings[m] = self.heads[m](pooled)
            batch = pooled.shape[0]
            mask = present.get(m) if present is not None else None
            out.present[m] = mask if mask is not None else torch.ones(batch, dtype=torch.bool, device=pooled.device)
        return out

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

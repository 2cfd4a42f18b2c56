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

from mmssl.architectures.masked_views import MaskedViews
from mmssl.architectures.outputs import ModelOutput, ModelSpec, tower_name
from mmssl.architectures.towers import ArchitectureError, Tower


def as_tokens(features: Tensor) -> Tensor:
    """``[B, T, D]`` token states; a CNN feature map ``[B, C, H, W]`` becomes ``[B, H·W, C]``."""
    if features.ndim == 4:
        return features.flatten(2).transpose(1, 2)
    if features.ndim == 2:
        return features.unsqueeze(1)
    return features


def batch_size(x: Any) -> int:
    """Rows of a modality's input (a tensor, or a dict of tensors such as text's ids + mask)."""
    return int(next(iter(x.values())).shape[0]) if isinstance(x, Mapping) else int(x.shape[0])


def present_rows(present: Mapping[str, Tensor], modality: str) -> int:
    """How many rows carry ``modality``: the host-side count a `data_pipelines.batch.Presence` carries (no device
    read), else counted from the mask (which waits for the device)."""
    count = getattr(present, "count", None)
    known = count(modality) if count is not None else None
    return known if known is not None else int(present[modality].sum())


def select_rows(x: Any, rows: Tensor) -> Any:
    if isinstance(x, Mapping):
        return {k: v.index_select(0, rows) for k, v in x.items()}
    return x.index_select(0, rows)


def scatter_rows(values: Tensor, rows: Tensor, batch: int) -> Tensor:
    """``[n, ...]`` values of ``rows`` placed into a zero ``[batch, ...]`` tensor (differentiable in ``values``)."""
    full = values.new_zeros((batch, *values.shape[1:]))
    return full.index_copy(0, rows, values)


class FusionFreeModel(MaskedViews, nn.Module):
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
        """Encode each given modality with its tower. Rows whose modality is absent (``present`` False) are not
        encoded: the tower sees only the present rows (so batch statistics, e.g. BatchNorm, and cost depend on
        them alone) and the absent rows' outputs are zeros with an all-False token mask. If no row of a batch
        carries the modality, the tower still runs once on the whole batch, so every rank calls every tower
        (parameter-gathering hooks under ZeRO-3 stay in step). Whether every row, none or some carry it is read
        from the presence's host-side counts (`present_rows`), so only a batch with some rows absent waits for the
        device (to index them)."""
        unknown = sorted(m for m in inputs if tower_name(m) not in self.towers)
        if unknown:
            raise ArchitectureError(f"the model has no tower for modality {unknown[0]!r} (towers: {self.modalities})")
        out = ModelOutput(embeddings={}, pooled={}, tokens={}, present={})
        for m, x in inputs.items():
            name = tower_name(m)
            batch = batch_size(x)
            mask = present.get(m) if present is not None else None
            rows = None
            if mask is not None and 0 < present_rows(present, m) < batch:
                rows = mask.nonzero().squeeze(1)
                x = select_rows(x, rows)
            features, pooled = self.towers[name](x)
            tokens = as_tokens(features)
            embedding = self.heads[name](pooled)
            token_mask = self.towers[name].feature_mask(x)
            if token_mask is None or token_mask.shape != tokens.shape[:2]:  # CNN maps, ViT tokens: all real
                token_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            if rows is not None:
                tokens, pooled, embedding, token_mask = (scatter_rows(t, rows, batch)
                                                         for t in (tokens, pooled, embedding, token_mask))
            elif mask is not None:
                token_mask = token_mask & mask.view(-1, 1)  # no row present: encoded, but no real token
            out.tokens[m], out.pooled[m], out.embeddings[m], out.token_mask[m] = tokens, pooled, embedding, token_mask
            out.present[m] = mask if mask is not None else torch.ones(batch, dtype=torch.bool, device=pooled.device)
        return out

    def forward(self, inputs: Mapping[str, Any], present: Mapping[str, Tensor] | None = None) -> ModelOutput:
        return self.encode_towers(inputs, present)

    def fuse(self, tokens: Mapping[str, Tensor], token_mask: Mapping[str, Tensor], query: str) -> Tensor:
        raise ArchitectureError(f"model.family={self.family!r} has no fusion module")

    def encode(self, modality: str, x: Any) -> Tensor:
        """The projected embedding of one modality."""
        return self.forward({modality: x}).embeddings[modality]

    def input_embeddings(self, modality: str) -> nn.Embedding | None:
        """``modality``'s token-id embedding table (text towers), which an MLM decoder may tie its weight to."""
        if modality not in self.towers:
            return None
        return self.towers[modality].input_embeddings()

    def frozen_sources(self) -> dict[str, str | None]:
        """Module prefix -> the local weights file of each frozen tower (None: frozen at its random init)."""
        return {f"towers.{m}": getattr(t, "source", None) for m, t in self.towers.items()
                if not any(p.requires_grad for p in t.parameters())}

    # timm-style contract, delegated to the towers ------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for tower in self.towers.values():
            tower.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {f"towers.{m}.{n}" for m, t in self.towers.items() for n in t.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> dict[str, dict[str, Any]]:
        return {m: t.group_matcher(coarse) for m, t in self.towers.items()}

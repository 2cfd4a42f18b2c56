"""Cross-attention fusion (ALBEF, Li et al. 2021; FLAVA, Singh et al. 2022), generalised to N modalities.

The query modality's tokens ``q`` (projected to the fusion width ``F``) pass through ``depth`` pre-norm layers
(`architectures.layers.blocks.Block` with self- and cross-attention) of::

    q = q + SelfAttn(LN(q))                       (over the query tokens, padding masked)
    q = q + CrossAttn(LN(q), LN(c))               (keys/values: the context tokens of every other modality)
    q = q + MLP(LN(q))

where the context ``c`` concatenates each other modality's tokens, projected to ``F`` by a per-modality linear
map whose bias is the learned modality-type embedding, so a missing modality simply contributes no context tokens.
A row with no real context token at all (every other modality absent for it) gets no cross-attention update, and a
row with no real query token no self-attention update (its output is meaningless but finite, never NaN); so each
row's output depends on that row's real tokens only.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.layers.blocks import Block
from mmssl.architectures.outputs import tower_name


class CrossAttentionFusion(nn.Module):
    """``forward(tokens, token_mask, query) -> [B, T_query, width]`` (see the module docstring)."""

    def __init__(self, token_dims: Mapping[str, int], width: int = 256, depth: int = 2, heads: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ArchitectureError(f"model.fusion.width={width} must be divisible by model.fusion.heads={heads}")
        self.width = width
        self.inputs = nn.ModuleDict({m: nn.Linear(d, width) for m, d in token_dims.items()})
        self.layers = nn.ModuleList(Block(width, heads, mlp_ratio, context_dim=width, attn_drop=dropout)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def _project(self, name: str, x: Tensor) -> Tensor:
        return self.inputs[tower_name(name)](x)

    def forward(self, tokens: Mapping[str, Tensor], token_mask: Mapping[str, Tensor], query: str) -> Tensor:
        if query not in tokens:
            raise ArchitectureError(f"fusion query modality {query!r} is not among the tokens given "
                                    f"({sorted(tokens)})")
        others = [m for m in tokens if m != query]
        if not others:
            raise ArchitectureError(f"fusion of {query!r} needs at least one other modality's tokens")
        q = self._project(query, tokens[query])
        ctx = torch.cat([self._project(m, tokens[m]) for m in others], dim=1)
        masks = [token_mask.get(m) for m in others]
        ctx_mask = None
        if any(mk is not None for mk in masks):
            ctx_mask = torch.cat([mk if mk is not None else torch.ones(tokens[m].shape[:2], dtype=torch.bool,
                                                                        device=q.device)
                                  for m, mk in zip(others, masks, strict=True)], dim=1)
        for layer in self.layers:
            q = layer(q, token_mask.get(query), context=ctx, context_mask=ctx_mask)
        return self.norm(q)

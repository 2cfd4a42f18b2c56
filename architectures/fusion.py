"""Cross-attention fusion (ALBEF, Li et al. 2021; FLAVA, Singh et al. 2022), generalised to N modalities.

The query modality's tokens ``q`` (projected to the fusion width ``F``) pass through ``depth`` layers of::

    q = q + SelfAttn(LN(q))                       (over the query tokens, padding masked)
    q = q + CrossAttn(LN(q), LN(c))               (keys/values: the context tokens of every other modality)
    q = q + MLP(LN(q))

where the context ``c`` concatenates each other modality's tokens, projected to ``F`` by a per-modality linear
map whose bias is the learned modality-type embedding, so a missing modality simply contributes no context tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from architectures.errors import ArchitectureError
from architectures.outputs import tower_name


class FusionLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_ctx, self.norm_mlp = (nn.LayerNorm(width) for _ in range(4))
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, q: Tensor, q_pad: Tensor | None, ctx: Tensor, ctx_pad: Tensor | None) -> Tensor:
        h = self.norm_self(q)
        q = q + self.self_attn(h, h, h, key_padding_mask=q_pad, need_weights=False)[0]
        c = self.norm_ctx(ctx)
        q = q + self.cross_attn(self.norm_cross(q), c, c, key_padding_mask=ctx_pad, need_weights=False)[0]
        return q + self.mlp(self.norm_mlp(q))


class CrossAttentionFusion(nn.Module):
    """``forward(tokens, token_mask, query) -> [B, T_query, width]`` (see the module docstring)."""

    def __init__(self, token_dims: Mapping[str, int], width: int = 256, depth: int = 2, heads: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ArchitectureError(f"model.fusion.width={width} must be divisible by model.fusion.heads={heads}")
        self.width = width
        self.inputs = nn.ModuleDict({m: nn.Linear(d, width) for m, d in token_dims.items()})
        self.layers = nn.ModuleList(FusionLayer(width, heads, mlp_ratio, dropout) for _ in range(depth))
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
        q_mask = token_mask.get(query)
        q_pad = ~q_mask if q_mask is not None else None
        ctx = torch.cat([self._project(m, tokens[m]) for m in others], dim=1)
        masks = [token_mask.get(m) for m in others]
        ctx_pad = None
        if any(mk is not None for mk in masks):
            ctx_pad = ~torch.cat([mk if mk is not None else torch.ones(tokens[m].shape[:2], dtype=torch.bool,
                                                                        device=q.device)
                                  for m, mk in zip(others, masks, strict=True)], dim=1)
        for layer in self.layers:
            q = layer(q, q_pad, ctx, ctx_pad)
        return self.norm(q)

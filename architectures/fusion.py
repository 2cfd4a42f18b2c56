"""Cross-attention fusion (ALBEF, Li et al. 2021; FLAVA, Singh et al. 2022), generalised to N modalities.

The query modality's tokens ``q`` (projected to the fusion width ``F``) pass through ``depth`` layers of::

    q = q + SelfAttn(LN(q))                       (over the query tokens, padding masked)
    q = q + CrossAttn(LN(q), LN(c))               (keys/values: the context tokens of every other modality)
    q = q + MLP(LN(q))

where the context ``c`` concatenates each other modality's tokens, projected to ``F`` by a per-modality linear
map whose bias is the learned modality-type embedding, so a missing modality simply contributes no context tokens.
A row with no real context token at all (every other modality absent for it) gets no cross-attention update, and a
row with no real query token is encoded unmasked (its output is meaningless but finite, never NaN); so each row's
output depends on that row's real tokens only.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.outputs import tower_name


class FusionLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_ctx, self.norm_mlp = (nn.LayerNorm(width) for _ in range(4))
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, q: Tensor, q_pad: Tensor | None, ctx: Tensor, ctx_pad: Tensor | None,
                has_ctx: Tensor | None = None) -> Tensor:
        """``q_pad``/``ctx_pad``: ``bool[B, T]``, True = ignore; ``has_ctx``: ``[B, 1, 1]`` 0/1, rows with no real
        context token get no cross-attention update."""
        h = self.norm_self(q)
        q = q + self.self_attn(h, h, h, key_padding_mask=q_pad, need_weights=False)[0]
        c = self.norm_ctx(ctx)
        update = self.cross_attn(self.norm_cross(q), c, c, key_padding_mask=ctx_pad, need_weights=False)[0]
        q = q + (update if has_ctx is None else update * has_ctx)
        return q + self.mlp(self.norm_mlp(q))


def padding_mask(mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """``(key_padding_mask, has_real)`` from a real-token mask ``bool[B, T]``: rows without any real token are left
    unmasked (attention over nothing would be NaN) and flagged 0 in ``has_real`` (``[B, 1, 1]``)."""
    if mask is None:
        return None, None
    has_real = mask.any(dim=1)
    pad = ~mask & has_real.unsqueeze(1)
    return pad, has_real.to(torch.get_default_dtype()).view(-1, 1, 1)


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
        q_pad, _ = padding_mask(token_mask.get(query))
        ctx = torch.cat([self._project(m, tokens[m]) for m in others], dim=1)
        masks = [token_mask.get(m) for m in others]
        ctx_mask = None
        if any(mk is not None for mk in masks):
            ctx_mask = torch.cat([mk if mk is not None else torch.ones(tokens[m].shape[:2], dtype=torch.bool,
                                                                        device=q.device)
                                  for m, mk in zip(others, masks, strict=True)], dim=1)
        ctx_pad, has_ctx = padding_mask(ctx_mask)
        if has_ctx is not None:
            has_ctx = has_ctx.to(q.dtype)
        for layer in self.layers:
            q = layer(q, q_pad, ctx, ctx_pad, has_ctx)
        return self.norm(q)

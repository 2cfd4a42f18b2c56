"""The one pre-norm transformer block (Vaswani et al. 2017; pre-norm as in ViT, Dosovitskiy et al. 2021, and timm's
``Block``), from which every transformer of mmssl is built: fusion operators, the unified encoder, bridges, the
Perceiver, and the decoders objectives own (they get it through ``ModelSpec.block``).

Each sublayer but the MLP is optional::

    x = x + DropPath(Attn(LN_1(x), key_mask, allowed))                       self-attention (default on)
    x = x + DropPath(g_c · Attn(LN_q(x), LN_c(c), context_mask))              cross-attention, when built with
                                                                              context_dim and called with c
    x = x + DropPath(g_m · MLP(LN_2(x)))                                      MLP = W_2 GELU(W_1 x) (timm Mlp)

``Attn`` is `architectures.layers.attention.Attention` (one mask convention: True = may attend; a row with no key
gets a zero update). Options:

* ``gated`` (Flamingo's gated cross-attention dense block, Alayrac et al. 2022): ``g_c = tanh(α)``,
  ``g_m = tanh(β)`` with ``α = β = 0`` at init, so the block starts as the identity; otherwise ``g = 1``.
* ``queries_as_keys`` (Flamingo's Perceiver resampler): the cross-attention's keys/values are ``[LN_c(c); LN_q(x)]``.
* ``norm_context=False``: ``LN_c`` is the identity (Flamingo's gated blocks read the resampler's normed output).
* ``experts`` (mixture of modality experts: VLMo, Bao et al. 2022; BEiT-3's multiway blocks, Wang et al. 2023):
  one ``LN_2``/``MLP`` pair per named expert; ``route`` lists ``(expert, length)`` per consecutive segment of the
  sequence and segment ``i`` goes through expert ``e_i``, while attention stays shared over all segments.
* ``drop_path``: stochastic depth (Huang et al. 2016), per sample, so no statistic is shared between rows.

Parameter names follow timm: ``norm1``, ``attn``, ``norm2``, ``mlp`` (``fc1``, ``fc2``); the cross-attention adds
``norm_cross``, ``norm_context``, ``cross_attn`` and, gated, ``cross_gate``, ``mlp_gate``; with experts ``norm2``
and ``mlp`` are dicts keyed by expert.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.layers.attention import Attention

Route = Sequence[tuple[str, int]]  # (expert name, number of tokens) per consecutive segment of the sequence


def init_vit_weights(module: nn.Module) -> None:
    """ViT initialisation (timm ``init_weights_vit_timm``): Linear weights truncated-normal(0.02), biases 0;
    LayerNorm weight 1, bias 0. Apply with ``module.apply``."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Block(nn.Module):
    """The block of the module docstring: ``forward(x, key_mask=None, *, allowed=None, context=None,
    context_mask=None, route=None) -> [B, T, width]``.

    Args:
        width, heads, mlp_ratio: the residual width, attention heads, MLP hidden width ``mlp_ratio · width``.
        self_attention: build the self-attention sublayer.
        context_dim: build a cross-attention sublayer reading a context of this width (None: none).
        norm_context, queries_as_keys, gated, experts, drop_path: see the module docstring.
        head_dim: per-head width of both attentions (default ``width / heads``).
        attn_bias: biases of the attention projections.
        causal: the self-attention is causal (query ``i`` sees keys ``j <= i``).
        attn_drop: dropout on the attention weights; mlp_drop: dropout inside the MLP.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, *, self_attention: bool = True,
                 context_dim: int | None = None, norm_context: bool = True, queries_as_keys: bool = False,
                 gated: bool = False, experts: Sequence[str] | None = None, head_dim: int | None = None,
                 attn_bias: bool = True, causal: bool = False, attn_drop: float = 0.0, mlp_drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        if not self_attention and context_dim is None:
            raise ArchitectureError("a block needs self-attention, cross-attention (context_dim) or both")
        attention = {"head_dim": head_dim, "bias": attn_bias, "attn_drop": attn_drop}
        self.norm1 = nn.LayerNorm(width) if self_attention else None
        self.attn = Attention(width, heads, causal=causal, **attention) if self_attention else None
        self.queries_as_keys = queries_as_keys
        cross = context_dim is not None
        self.norm_cross = nn.LayerNorm(width) if cross else None
        self.norm_context = (nn.LayerNorm(context_dim) if norm_context else nn.Identity()) if cross else None
        self.cross_attn = Attention(width, heads, context_dim=context_dim, **attention) if cross else None
        self.cross_gate = nn.Parameter(torch.zeros(1)) if cross and gated else None
        self.experts = None if experts is None else list(experts)
        if self.experts is not None and not self.experts:
            raise ArchitectureError("a mixture-of-modality-experts block needs at least one expert")
        hidden = int(width * mlp_ratio)
        if self.experts is None:
            self.norm2: nn.Module = nn.LayerNorm(width)
            self.mlp: nn.Module = Mlp(width, hidden, act_layer=nn.GELU, drop=mlp_drop)
        else:
            self.norm2 = nn.ModuleDict({e: nn.LayerNorm(width) for e in self.experts})
            self.mlp = nn.ModuleDict({e: Mlp(width, hidden, act_layer=nn.GELU, drop=mlp_drop) for e in self.experts})
        self.mlp_gate = nn.Parameter(torch.zeros(1)) if gated else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, key_mask: Tensor | None = None, *, allowed: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                route: Route | None = None) -> Tensor:
        """``x`` ``[B, T, width]``; ``key_mask`` ``bool[B, T]`` and ``allowed`` ``bool[B, T, T]`` mask the
        self-attention; ``context`` ``[B, S, context_dim]`` with ``context_mask`` ``bool[B, S]`` feeds the
        cross-attention (None: no cross-attention update, e.g. a MulT source that is not given); ``route`` routes
        the segments to their experts (ignored by a block without experts)."""
        if self.attn is not None:
            x = x + self.drop_path(self.attn(self.norm1(x), key_mask=key_mask, allowed=allowed))
        if context is not None:
            x = x + self.drop_path(_gated(self.cross_gate, self._cross(x, context, context_mask)))
        return x + self.drop_path(_gated(self.mlp_gate, self._mlp(x, route)))

    def _cross(self, x: Tensor, context: Tensor, context_mask: Tensor | None) -> Tensor:
        if self.cross_attn is None:
            raise ArchitectureError("this block has no cross-attention (built without context_dim), but a context "
                                    "was given")
        h, c = self.norm_cross(x), self.norm_context(context)
        if self.queries_as_keys:
            c = torch.cat([c, h], dim=1)
            if context_mask is not None:
                context_mask = torch.cat([context_mask.bool(), context_mask.new_ones(h.shape[:2], dtype=torch.bool)],
                                         dim=1)
        return self.cross_attn(h, c, key_mask=context_mask)

    def _mlp(self, x: Tensor, route: Route | None) -> Tensor:
        if self.experts is None:
            return self.mlp(self.norm2(x))
        if not route:
            raise ArchitectureError(f"a block with experts {self.experts} needs a route of (expert, length) segments")
        if len(route) == 1:
            return self._expert(route[0][0], x)
        lengths = [n for _, n in route]
        if sum(lengths) != x.shape[1]:
            raise ArchitectureError(f"expert route lengths {lengths} do not cover the {x.shape[1]} tokens")
        return torch.cat([self._expert(name, seg) for (name, _), seg in zip(route, x.split(lengths, dim=1),
                                                                           strict=True)], dim=1)

    def _expert(self, name: str, x: Tensor) -> Tensor:
        if name not in self.mlp:
            raise ArchitectureError(f"no feed-forward expert {name!r} in this block (experts: {self.experts})")
        return self.mlp[name](self.norm2[name](x))


def _gated(gate: Tensor | None, update: Tensor) -> Tensor:
    """``tanh(gate) · update`` (Flamingo's gates), or ``update`` for an ungated block."""
    return update if gate is None else gate.tanh().to(update.dtype) * update

"""Transformer blocks with shared self-attention and per-modality feed-forward experts (mixture of modality experts,
VLMo, Bao et al. 2022; the "multiway" blocks of BEiT-3, Wang et al. 2023).

A pre-norm block over a token sequence ``x`` split into modality segments ``x = [x_1; ...; x_k]``::

    x   = x + DropPath(Attn(LN_1(x), keep))                  one attention over all segments (shared weights)
    x_i = x_i + DropPath(MLP_{e_i}(LN_{e_i}(x_i)))           segment i goes through the FFN expert e_i

where ``keep`` is a key padding mask (``bool[B, S]``, True = a real key) and ``Attn`` is multi-head scaled
dot-product attention (Vaswani et al. 2017): ``softmax(Q K^T / sqrt(d_h) + M) V`` with ``M = -inf`` on masked keys.
Each expert owns its LayerNorm and MLP, as VLMo's experts do. With a single expert (``experts=None``) the block is a
plain ViT block (Dosovitskiy et al. 2021). Stochastic depth (DropPath, Huang et al. 2016) is per sample, so no
statistic is shared between rows of a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from mmssl.architectures.errors import ArchitectureError

SHARED_EXPERT = "shared"  # the one FFN of a block without modality experts
FUSION_EXPERT = "fusion"  # the FFN of a fusion block in the experts variant (VLMo's "VL" expert)

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


def attention_bias(keep: Tensor | None) -> Tensor | None:
    """A key padding mask ``bool[B, S]`` (True = real key) as an SDPA boolean mask ``[B, 1, 1, S]`` (True = may
    attend), broadcast over heads and queries. A row with no real key at all (an absent modality's padding) may
    attend to every key, so its meaningless outputs stay finite instead of NaN."""
    if keep is None:
        return None
    keep = keep.bool()
    return (keep | ~keep.any(dim=1, keepdim=True))[:, None, None, :]


class MaskedAttention(nn.Module):
    """Multi-head attention of ``x`` (queries) over ``context`` (keys/values; ``x`` itself when not given) with a
    key padding mask, computed by ``F.scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if width % heads:
            raise ArchitectureError(f"attention width {width} is not divisible by heads={heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.q = nn.Linear(width, width, bias=qkv_bias)
        self.kv = nn.Linear(width, 2 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def _split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, keep: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        ctx = x if context is None else context
        q = self._split(self.q(x))
        k, v = (self._split(t) for t in self.kv(ctx).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias(keep))
        return self.proj(out.transpose(1, 2).reshape(x.shape))


class Expert(nn.Module):
    """One feed-forward expert: ``MLP(LN(x))`` (timm ``Mlp``: Linear, GELU, Linear)."""

    def __init__(self, width: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm(x))


class MomeBlock(nn.Module):
    """The block of the module docstring. ``experts`` names the FFN experts (``None``: one shared FFN, to which
    every route is sent). ``forward(x, keep, route)``: ``route`` lists ``(expert, length)`` per segment, lengths
    summing to ``x.shape[1]``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, experts: Sequence[str] | None = None,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.routed = experts is not None
        names = list(experts) if experts is not None else [SHARED_EXPERT]
        if not names:
            raise ArchitectureError("a mixture-of-modality-experts block needs at least one expert")
        self.norm = nn.LayerNorm(width)
        self.attn = MaskedAttention(width, heads)
        self.ffn = nn.ModuleDict({name: Expert(width, mlp_ratio) for name in names})
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def expert(self, name: str) -> Expert:
        if not self.routed:
            return self.ffn[SHARED_EXPERT]
        if name not in self.ffn:
            raise ArchitectureError(f"no feed-forward expert {name!r} in this block (experts: {list(self.ffn)})")
        return self.ffn[name]

    def forward(self, x: Tensor, keep: Tensor | None, route: Route) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm(x), keep))
        if not self.routed or len(route) == 1:
            return x + self.drop_path(self.expert(route[0][0])(x))
        lengths = [n for _, n in route]
        if sum(lengths) != x.shape[1]:
            raise ArchitectureError(f"expert route lengths {lengths} do not cover the {x.shape[1]} tokens")
        parts = [self.expert(name)(seg) for (name, _), seg in zip(route, x.split(lengths, dim=1), strict=True)]
        return x + self.drop_path(torch.cat(parts, dim=1))

"""Multi-head scaled dot-product attention (Vaswani et al. 2017, "Attention Is All You Need"): the one attention of
mmssl, with one mask convention, computed by ``F.scaled_dot_product_attention``.

Queries ``x`` ``[B, T, D]`` attend to a context ``c`` ``[B, S, D_c]`` (``x`` itself for self-attention)::

    Attn(x, c) = W_o concat_h softmax(q_h k_hᵀ / √d_h + M) v_h,      q = W_q x,   [k; v] = W_kv c

with ``H`` heads of width ``d_h = D / H``, or ``head_dim``: an inner width ``H·d_h`` independent of ``D`` (Flamingo's
key/value size 128 at every width, Alayrac et al. 2022, App. C.1). ``D_c`` may differ from ``D`` (BLIP-2's Q-Former
reads a vision tower of another width). The masks all say True = may attend, and are combined by AND:

* ``key_mask`` ``bool[B, S]``: True at a real key (False: padding, or the tokens of a modality absent for the row);
* ``allowed`` ``bool[B, T, S]``: any other pattern (a prefix-LM decoder's: bidirectional prefix, causal rest);
* ``causal`` (set at construction): query ``i`` may attend key ``j`` iff ``j <= i``;

``M`` is ``0`` where the combined mask allows and ``-inf`` elsewhere. A query row with no allowed key gets a zero
update: it attends to every key (finite), and its output is replaced by exactly 0, so neither its value nor its
gradient is NaN or garbage. Keys masked by ``key_mask`` are zeroed before the key/value projection, so a padding
token's value, even inf or NaN, reaches no output and no projection's gradient (what runs before the attention, a
LayerNorm for one, is the caller's business: MulT zeroes padding before its input projection).

Parameters: ``q`` (``D -> H·d_h``), ``kv`` (``D_c -> 2·H·d_h``: the keys' rows, then the values'; heads in order
within each) and ``proj`` (``H·d_h -> D``), all with biases unless ``bias=False`` (Flamingo's have none). Self- and
cross-attention share this layout (queries and keys/values are projected separately, so that a masked key's input
is zeroed while the same token's query is not); ``nn.MultiheadAttention``'s ``in_proj`` rows are ``[q; kv]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.architectures.errors import ArchitectureError


def attention_mask(key_mask: Tensor | None, allowed: Tensor | None, *, causal: bool, queries: int, keys: int,
                   device: torch.device) -> Tensor | None:
    """The combined boolean mask (True = may attend) broadcastable to ``[B, H, T, S]``, or None when nothing is
    masked: ``key_mask`` ``[B, S]`` -> ``[B, 1, 1, S]``, ``allowed`` ``[B, T, S]`` -> ``[B, 1, T, S]``, and with
    ``causal`` the pattern ``j <= i`` as ``[1, 1, T, S]``."""
    mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
    if allowed is not None:
        pattern = allowed.bool()[:, None]
        mask = pattern if mask is None else mask & pattern
    if causal:
        lower = torch.ones(queries, keys, dtype=torch.bool, device=device).tril()[None, None]
        mask = lower if mask is None else mask & lower
    return mask


class Attention(nn.Module):
    """The attention of the module docstring: ``forward(x, context=None, *, key_mask=None, allowed=None)`` ->
    ``[B, T, D]``.

    Args:
        dim: the query width ``D`` (and the output's).
        heads: the number of heads ``H``.
        context_dim: the context width ``D_c`` (default ``D``).
        head_dim: the per-head width ``d_h`` (default ``D / H``, which must then be whole).
        bias: biases on ``q``, ``kv`` and ``proj``.
        attn_drop: dropout on the attention weights, in training.
        causal: query ``i`` attends keys ``j <= i`` only.
    """

    def __init__(self, dim: int, heads: int, *, context_dim: int | None = None, head_dim: int | None = None,
                 bias: bool = True, attn_drop: float = 0.0, causal: bool = False) -> None:
        super().__init__()
        if heads < 1:
            raise ArchitectureError(f"attention needs heads >= 1, got {heads}")
        if head_dim is None:
            if dim % heads:
                raise ArchitectureError(f"attention width {dim} is not divisible by heads={heads}")
            head_dim = dim // heads
        if head_dim < 1:
            raise ArchitectureError(f"attention needs head_dim >= 1, got {head_dim}")
        self.heads, self.head_dim, self.attn_drop, self.causal = heads, head_dim, attn_drop, causal
        inner = heads * head_dim
        self.q = nn.Linear(dim, inner, bias=bias)
        self.kv = nn.Linear(dim if context_dim is None else context_dim, 2 * inner, bias=bias)
        self.proj = nn.Linear(inner, dim, bias=bias)

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_mask: Tensor | None = None,
                allowed: Tensor | None = None) -> Tensor:
        """``x`` ``[B, T, D]`` attends to ``context`` ``[B, S, D_c]`` (``x`` when None) where ``key_mask``
        ``bool[B, S]``, ``allowed`` ``bool[B, T, S]`` and the causal pattern all allow (module docstring)."""
        context = x if context is None else context
        if key_mask is not None:
            key_mask = key_mask.bool()
            context = context.masked_fill(~key_mask[..., None], 0.0)
        (b, t, _), s = x.shape, context.shape[1]
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).view(b, s, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = attention_mask(key_mask, allowed, causal=self.causal, queries=t, keys=s, device=x.device)
        dropout = self.attn_drop if self.training else 0.0
        has_key = None if mask is None else mask.any(dim=-1, keepdim=True)  # [B|1, 1, T|1, 1]
        if has_key is not None:
            mask = mask | ~has_key  # a keyless row attends everywhere (finite), then is zeroed below
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        return out if has_key is None else out.masked_fill(~has_key[:, 0], 0.0)

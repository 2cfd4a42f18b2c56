"""A Perceiver latent bottleneck (Jaegle et al. 2021, "Perceiver"; Perceiver IO, Jaegle et al. 2022), the
modality-agnostic unimodal encoder of HighMMT (Liang et al. 2022).

``L`` learned latent vectors ``z`` (``[1, L, D]``, shared by every modality) read an input token sequence ``x``
(``[B, T, D]``, padding marked by ``keep``) through ``depth`` pre-norm cross-attention layers::

    z = z + CrossAttn(LN_q(z), LN_kv(x), keep)          queries: the latents; keys/values: the input tokens
    z = z + MLP(LN(z))

so the output is ``[B, L, D]`` whatever ``T`` is, and the self-attention that follows costs ``O(L^2)`` instead of
``O(T^2)``. The cross-attention is the only place that touches the input, and it has no positional term of its own:
permuting the input tokens (together with their positional encodings) leaves the latents unchanged.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.mome import MaskedAttention, init_vit_weights


class CrossAttentionLayer(nn.Module):
    """One layer of the module docstring: latents attend to the input tokens, then an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = MaskedAttention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=nn.GELU)

    def forward(self, z: Tensor, x: Tensor, keep: Tensor | None) -> Tensor:
        z = z + self.attn(self.norm_q(z), keep, context=self.norm_kv(x))
        return z + self.mlp(self.norm_mlp(z))


class PerceiverEncoder(nn.Module):
    """``forward(x [B, T, D], keep bool[B, T]) -> [B, L, D]`` latent states (see the module docstring)."""

    def __init__(self, width: int, heads: int, num_latents: int, depth: int = 1, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if num_latents < 1:
            raise ArchitectureError(f"model.unified.latents must be >= 1 for a Perceiver bottleneck, got {num_latents}")
        if depth < 1:
            raise ArchitectureError(f"model.unified.latent_depth must be >= 1, got {depth}")
        self.latents = nn.Parameter(torch.empty(1, num_latents, width))
        self.layers = nn.ModuleList(CrossAttentionLayer(width, heads, mlp_ratio) for _ in range(depth))
        self.grad_checkpointing = False
        nn.init.trunc_normal_(self.latents, std=0.02)
        self.layers.apply(init_vit_weights)

    @property
    def num_latents(self) -> int:
        return int(self.latents.shape[1])

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        z = self.latents.expand(x.shape[0], -1, -1).to(x.dtype)
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                z = checkpoint(layer, z, x, keep, use_reentrant=False)
            else:
                z = layer(z, x, keep)
        return z

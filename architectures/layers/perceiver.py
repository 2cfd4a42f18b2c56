"""The one Perceiver latent bottleneck (Jaegle et al. 2021, "Perceiver"; Perceiver IO, Jaegle et al. 2022): HighMMT's
modality-agnostic unimodal encoder (Liang et al. 2022) and Flamingo's Perceiver resampler (Alayrac et al. 2022).

``L`` learned latents ``Z_0`` (``[L, D]``, shared by every row and modality) read input tokens ``x`` (``[B, T, D_in]``,
projected to ``D`` when ``in_dim`` differs, padding marked by ``key_mask``) through ``depth`` pre-norm
cross-attention blocks (`architectures.layers.blocks.Block` without self-attention)::

    X = W_in x + b_in                                 (in_dim given and != D; else X = x)
    Z = Z + CrossAttn(LN_q(Z), K, key_mask)           K = LN_c(X)                (HighMMT, Perceiver)
                                                      K = [LN_c(X); LN_q(Z)]     (latents_as_keys: Flamingo)
    Z = Z + MLP(LN(Z))
    out = LN_f(Z)                                     (final_norm: Flamingo; else out = Z)

so the output is ``[B, L, D]`` whatever ``T`` is, and what follows costs ``O(L^2)`` instead of ``O(T^2)``. The
cross-attention is the only place that touches the input, and it has no positional term of its own: permuting the
input tokens (with their positional encodings) leaves the latents unchanged. Without the latents among the keys, a
row with no real input token gets no attention update (its latents are the learned ones through the MLPs), never
NaN. Parameters are ViT-initialised (truncated-normal 0.02 weights and latents, zero biases).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.layers.blocks import Block, init_vit_weights


class Perceiver(nn.Module):
    """``forward(x [B, T, D_in], key_mask bool[B, T] | None) -> [B, L, width]`` (module docstring).

    Args:
        width, heads, num_latents, depth, mlp_ratio: ``D``, attention heads, ``L``, blocks, MLP ratio.
        in_dim: the input width ``D_in`` (default ``width``; a different one adds the projection ``input``).
        latents_as_keys: the latents are keys/values too (Flamingo's resampler).
        final_norm: a LayerNorm on the output (Flamingo's resampler).
        head_dim, attn_bias: as `architectures.layers.blocks.Block` (Flamingo: ``head_dim``, no biases).
    """

    def __init__(self, width: int, heads: int, num_latents: int, depth: int = 1, mlp_ratio: float = 4.0, *,
                 in_dim: int | None = None, latents_as_keys: bool = False, final_norm: bool = False,
                 head_dim: int | None = None, attn_bias: bool = True) -> None:
        super().__init__()
        if num_latents < 1 or depth < 1:
            raise ArchitectureError(f"a Perceiver needs num_latents >= 1 and depth >= 1, got {num_latents} and "
                                    f"{depth}")
        self.input = nn.Linear(in_dim, width) if in_dim is not None and in_dim != width else nn.Identity()
        self.latents = nn.Parameter(torch.empty(num_latents, width))
        self.layers = nn.ModuleList(Block(width, heads, mlp_ratio, self_attention=False, context_dim=width,
                                          queries_as_keys=latents_as_keys, head_dim=head_dim, attn_bias=attn_bias)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width) if final_norm else nn.Identity()
        self.grad_checkpointing = False
        self.apply(init_vit_weights)
        nn.init.trunc_normal_(self.latents, std=0.02)

    @property
    def num_latents(self) -> int:
        return int(self.latents.shape[0])

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        x = self.input(x)
        z = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                z = checkpoint(layer, z, context=x, context_mask=key_mask, use_reentrant=False)
            else:
                z = layer(z, context=x, context_mask=key_mask)
        return self.norm(z)

"""Flamingo's bridge (Alayrac et al. 2022): a Perceiver resampler and gated cross-attention inside a frozen LM.

Perceiver resampler: ``m`` learned latents ``X`` (``[m, w]``) read the vision tokens ``V`` (projected to ``w``)::

    X = X + Attn(q = LN(X), kv = [LN(V); LN(X)])     (keys: the vision tokens and the latents themselves)
    X = X + FFN(LN(X))                                 (FFN = W2 GELU(W1 x)), ``depth`` times, then LN

(a single image here, so Flamingo's learned time embeddings, one per video frame, are left out). With
``head_dim``, attention has ``heads x head_dim`` inner width whatever the model width, and no biases
(`InnerAttention`; Flamingo uses key/value size 128 everywhere, App. C.1); without, ``nn.MultiheadAttention``.

Gated cross-attention dense block, inserted before every ``every``-th frozen LM layer (layers ``0, k, 2k, ...``),
on the LM's hidden states ``x`` with the resampled visual context ``v``::

    y = x + tanh(α) · XAttn(q = LN(x), kv = v)
    y = y + tanh(β) · FFN(LN(y))                       α = β = 0 at init: the stitched LM starts as the frozen LM

The blocks are not spliced into the LM: `FlamingoBridge.attach` registers a forward pre-hook (``with_kwargs``) on
each chosen layer that replaces the layer's input hidden states by the block's output while a visual context is
set (`FlamingoBridge.conditioning`); with no context the hook does nothing, so the same LM serves text-only
passes. The hook calls each block through its own ``__call__``, so ZeRO-3's parameter-gathering hooks fire.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.stitching.bridges import Bridge, BridgeOutput, check_positive


class InnerAttention(nn.Module):
    """Multi-head attention whose inner width ``heads · head_dim`` need not equal the model width (Flamingo's
    Perceiver and cross-attention: key/value size 128 for every width, no biases)::

        Attn(x, c) = W_o concat_h softmax(q_h k_hᵀ / √head_dim) v_h,   q = W_q x,  [k; v] = W_kv c
    """

    def __init__(self, width: int, context_dim: int, *, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = check_positive("heads", heads), check_positive("head_dim", head_dim)
        inner = heads * head_dim
        self.q = nn.Linear(width, inner, bias=False)
        self.kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.out = nn.Linear(inner, width, bias=False)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


def attention(width: int, context_dim: int, heads: int, head_dim: int | None) -> nn.Module:
    """`InnerAttention` when ``head_dim`` is given, else ``nn.MultiheadAttention`` (inner width = ``width``)."""
    if head_dim is not None:
        return InnerAttention(width, context_dim, heads=heads, head_dim=head_dim)
    return nn.MultiheadAttention(width, heads, kdim=context_dim, vdim=context_dim, batch_first=True)


def attend(attn: nn.Module, x: Tensor, context: Tensor) -> Tensor:
    if isinstance(attn, InnerAttention):
        return attn(x, context)
    return attn(x, context, context, need_weights=False)[0]


def feed_forward(width: int, mlp_ratio: float) -> nn.Sequential:
    hidden = int(width * mlp_ratio)
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


class ResamplerLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, head_dim: int | None = None) -> None:
        super().__init__()
        self.norm_latents, self.norm_media = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = attention(width, width, heads, head_dim)
        self.ffn = feed_forward(width, mlp_ratio)

    def forward(self, latents: Tensor, media: Tensor) -> Tensor:
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_media(media), q], dim=1)
        latents = latents + attend(self.attn, q, kv)
        return latents + self.ffn(latents)


class PerceiverResampler(nn.Module):
    """``[B, T, D_v] -> [B, m, w]`` (module docstring)."""

    def __init__(self, vision_dim: int, width: int, *, num_latents: int = 64, depth: int = 2, heads: int = 4,
                 mlp_ratio: float = 4.0, head_dim: int | None = None) -> None:
        super().__init__()
        if width % heads and head_dim is None:
            raise ArchitectureError(f"model.stitched.options.width={width} must be divisible by "
                                    f"model.stitched.options.heads={heads}")
        self.input = nn.Linear(vision_dim, width) if vision_dim != width else nn.Identity()
        self.latents = nn.Parameter(torch.randn(check_positive("num_latents", num_latents), width) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(width, heads, mlp_ratio, head_dim)
                                    for _ in range(check_positive("depth", depth)))
        self.norm = nn.LayerNorm(width)
        self.grad_checkpointing = False

    def forward(self, media: Tensor) -> Tensor:
        media = self.input(media)
        x = self.latents.to(media.dtype).expand(media.shape[0], -1, -1)
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, media, use_reentrant=False)
            else:
                x = layer(x, media)
        return self.norm(x)


class GatedCrossAttention(nn.Module):
    """``y = x + tanh(α)·XAttn(LN(x), v)``, ``y = y + tanh(β)·FFN(LN(y))``; ``α = β = 0`` at init."""

    def __init__(self, lm_dim: int, context_dim: int, *, heads: int = 4, mlp_ratio: float = 4.0,
                 head_dim: int | None = None) -> None:
        super().__init__()
        if lm_dim % heads and head_dim is None:
            raise ArchitectureError(f"model.stitched.options.xattn_heads={heads} must divide the LM width {lm_dim}")
        self.norm = nn.LayerNorm(lm_dim)
        self.attn = attention(lm_dim, context_dim, heads, head_dim)
        self.ffn = feed_forward(lm_dim, mlp_ratio)
        self.attn_gate = nn.Parameter(torch.zeros(1))  # α
        self.ffn_gate = nn.Parameter(torch.zeros(1))  # β

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        context = context.to(x.dtype)
        y = x + self.attn_gate.tanh().to(x.dtype) * attend(self.attn, self.norm(x), context)
        return y + self.ffn_gate.tanh().to(x.dtype) * self.ffn(y)


class FlamingoBridge(Bridge):
    """Resampler + gated cross-attention blocks for a frozen LM of ``num_lm_layers`` layers (module docstring).
    ``tokens`` of the output are the resampled latents (``width`` wide); there are no soft prompts."""

    kind = "flamingo"

    def __init__(self, vision_dim: int, lm_dim: int, *, num_lm_layers: int, every: int = 1, width: int = 256,
                 num_latents: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: float = 4.0,
                 xattn_heads: int = 4, xattn_mlp_ratio: float = 4.0, head_dim: int | None = None) -> None:
        super().__init__()
        self.vision_dim, self.lm_dim = check_positive("vision_dim", vision_dim), check_positive("lm_dim", lm_dim)
        self.width = check_positive("width", width)
        self.every = check_positive("every", every)
        self.insert_at = list(range(0, check_positive("num_lm_layers", num_lm_layers), self.every))
        self.resampler = PerceiverResampler(vision_dim, width, num_latents=num_latents, depth=depth, heads=heads,
                                            mlp_ratio=mlp_ratio, head_dim=head_dim)
        self.xattn = nn.ModuleList(GatedCrossAttention(lm_dim, width, heads=xattn_heads, mlp_ratio=xattn_mlp_ratio,
                                                       head_dim=head_dim)
                                   for _ in self.insert_at)
        self._context: Tensor | None = None
        self._handles: list[RemovableHandle] = []

    def forward(self, tokens: Tensor, pooled: Tensor) -> BridgeOutput:
        return BridgeOutput(self.resampler(tokens), None)

    def attach(self, layers: nn.ModuleList) -> None:
        """Hook block ``j`` before LM layer ``insert_at[j]`` of ``layers`` (the frozen LM's layer list)."""
        if self._handles:
            raise ArchitectureError("this Flamingo bridge is already attached to a language model")
        if len(layers) <= self.insert_at[-1]:
            raise ArchitectureError(f"the LM has {len(layers)} layers; the bridge was built for "
                                    f"num_lm_layers >= {self.insert_at[-1] + 1}")
        for slot, index in enumerate(self.insert_at):
            hook = functools.partial(self._before_layer, slot)
            self._handles.append(layers[index].register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def conditioning(self, context: Tensor) -> Iterator[None]:
        """While inside, every hooked LM layer first applies its gated cross-attention to ``context``."""
        if not self._handles:
            raise ArchitectureError("the Flamingo bridge is not attached to a language model (call attach)")
        self._context = context
        try:
            yield
        finally:
            self._context = None

    def _before_layer(self, slot: int, module: nn.Module, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self._context is None:
            return None
        if args:
            return (self.xattn[slot](args[0], self._context), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": self.xattn[slot](kwargs["hidden_states"], self._context)}
        raise ArchitectureError(f"cannot find the hidden states in the call of {type(module).__name__}")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.resampler.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        gates = {f"xattn.{i}.{g}" for i in range(len(self.xattn)) for g in ("attn_gate", "ffn_gate")}
        return {"resampler.latents", *gates}

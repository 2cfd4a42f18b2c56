"""Flamingo's bridge (Alayrac et al. 2022): a Perceiver resampler and gated cross-attention inside a frozen LM.

Perceiver resampler: ``m`` learned latents ``X`` (``[m, w]``) read the vision tokens ``V`` (projected to ``w``)::

    X = X + Attn(q = LN(X), kv = [LN(V); LN(X)])     (keys: the vision tokens and the latents themselves)
    X = X + FFN(LN(X))                                 (FFN = W2 GELU(W1 x)), ``depth`` times, then LN

(a single image here, so Flamingo's learned time embeddings, one per video frame, are left out): the one
`architectures.layers.perceiver.Perceiver` with the latents among the keys and a final LN. With ``head_dim``,
attention has ``heads x head_dim`` inner width whatever the model width, and no biases (Flamingo uses key/value size
128 everywhere, App. C.1); without, ``width / heads`` per head and biases.

Gated cross-attention dense block, inserted before every ``every``-th frozen LM layer (layers ``0, k, 2k, ...``),
on the LM's hidden states ``x`` with the resampled visual context ``v``::

    y = x + tanh(α) · XAttn(q = LN(x), kv = v)
    y = y + tanh(β) · FFN(LN(y))                       α = β = 0 at init: the stitched LM starts as the frozen LM

(`architectures.layers.blocks.Block` with ``gated=True``, cross-attention only).

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

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.layers.blocks import Block
from mmssl.architectures.layers.perceiver import Perceiver
from mmssl.architectures.stitching.bridges import Bridge, BridgeOutput, check_positive


def perceiver_resampler(vision_dim: int, width: int, *, num_latents: int, depth: int, heads: int, mlp_ratio: float,
                        head_dim: int | None) -> Perceiver:
    """``[B, T, D_v] -> [B, m, w]``: the module docstring's resampler (the latents are keys too, final LN)."""
    return Perceiver(width, heads, num_latents, depth, mlp_ratio, in_dim=vision_dim, latents_as_keys=True,
                     final_norm=True, head_dim=head_dim, attn_bias=head_dim is None)


def gated_cross_attention(lm_dim: int, context_dim: int, *, heads: int, mlp_ratio: float,
                          head_dim: int | None) -> Block:
    """``y = x + tanh(α)·XAttn(LN(x), v)``, ``y = y + tanh(β)·FFN(LN(y))``; ``α = β = 0`` at init."""
    return Block(lm_dim, heads, mlp_ratio, self_attention=False, context_dim=context_dim, norm_context=False,
                 gated=True, head_dim=head_dim, attn_bias=head_dim is None)


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
        heads, xattn_heads = check_positive("heads", heads), check_positive("xattn_heads", xattn_heads)
        if head_dim is not None:
            check_positive("head_dim", head_dim)
        if head_dim is None and width % heads:
            raise ArchitectureError(f"model.stitched.options.width={width} must be divisible by "
                                    f"model.stitched.options.heads={heads}")
        if head_dim is None and lm_dim % xattn_heads:
            raise ArchitectureError(f"model.stitched.options.xattn_heads={xattn_heads} must divide the LM width "
                                    f"{lm_dim}")
        self.resampler = perceiver_resampler(vision_dim, width, num_latents=check_positive("num_latents", num_latents),
                                             depth=check_positive("depth", depth), heads=heads, mlp_ratio=mlp_ratio,
                                             head_dim=head_dim)
        self.xattn = nn.ModuleList(gated_cross_attention(lm_dim, width, heads=xattn_heads, mlp_ratio=xattn_mlp_ratio,
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
            return (self._condition(slot, args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": self._condition(slot, kwargs["hidden_states"])}
        raise ArchitectureError(f"cannot find the hidden states in the call of {type(module).__name__}")

    def _condition(self, slot: int, hidden: Tensor) -> Tensor:
        assert self._context is not None
        return self.xattn[slot](hidden, context=self._context.to(hidden.dtype))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.resampler.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        gates = {f"xattn.{i}.{g}" for i in range(len(self.xattn)) for g in ("cross_gate", "mlp_gate")}
        return {"resampler.latents", *gates}

"""Trainable bridges from a frozen vision tower into a frozen language model: the contract and the soft-prompt maps.

A bridge reads the vision tower's token states ``v`` (``[B, T, D_v]``; a CNN feature map flattened to ``H·W``
tokens) and pooled feature ``p`` (``[B, D_v]``) and returns a `BridgeOutput`:

* ``tokens`` ``[B, n, width]``: the bridge's own representation of the image (its mean is the image's pooled
  feature, which the stitched model's head projects for contrastive learning);
* ``prompts`` ``[B, k, d]`` or None: soft prompts in the LM's input-embedding space (``d`` = LM hidden size),
  prepended to the text's token embeddings. None for bridges that condition the LM otherwise (Flamingo).

Maps here (every ``W``, ``b`` trainable):

* `LinearBridge` — Frozen (Tsimpoukelli et al. 2021): ``P = reshape(W p + b, [k, d])`` from the pooled feature;
  LiMBeR (Merullo et al. 2023), ``source="tokens"``: ``P_i = W v_i + b`` for every vision token (token sequence
  average-pooled to ``k`` first when ``num_prompts`` is given and differs from ``T``).
* `MLPBridge`: the same with ``W2 GELU(W1 x + b1) + b2`` in place of ``W x + b``.
* `PrefixMapper` — ClipCap (Mokady et al. 2021): ``mapping="mlp"``:
  ``P = reshape(W2 tanh(W1 p + b1) + b2, [k, d])`` with hidden width ``k·d/2``; ``mapping="transformer"``:
  ``X = reshape(W p + b, [k, d])``, ``P = Transformer([X; C])[k:]`` with ``C`` ``[k, d]`` learned constants and
  ``Transformer`` ``depth`` pre-norm self-attention blocks (`architectures.layers.blocks.Block`).
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.layers.blocks import Block

SOURCES = ("pooled", "tokens")
PREFIX_MAPPINGS = ("mlp", "transformer")


class BridgeOutput(NamedTuple):
    tokens: Tensor  # [B, n, width]
    prompts: Tensor | None  # [B, k, lm_dim] soft prompts, or None


class Bridge(nn.Module):
    """Base class of the contract in the module docstring."""

    kind: ClassVar[str]
    vision_dim: int
    lm_dim: int
    width: int  # width of BridgeOutput.tokens

    def forward(self, tokens: Tensor, pooled: Tensor) -> BridgeOutput:
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Bridges without a stack of layers have nothing to checkpoint."""

    def no_weight_decay(self) -> set[str]:
        return set()


def check_positive(name: str, value: int) -> int:
    if value < 1:
        raise ArchitectureError(f"model.stitched.options.{name} must be >= 1, got {value}")
    return int(value)


class LinearBridge(Bridge):
    """Frozen / LiMBeR linear map into ``k`` soft prompts (module docstring)."""

    kind = "linear"

    def __init__(self, vision_dim: int, lm_dim: int, *, num_prompts: int | None = 2, source: str = "pooled") -> None:
        super().__init__()
        if source not in SOURCES:
            raise ArchitectureError(f"model.stitched.options.source must be one of {SOURCES}, got {source!r}")
        if source == "pooled" and num_prompts is None:
            raise ArchitectureError("model.stitched.options.num_prompts is required with source='pooled'")
        self.vision_dim, self.lm_dim = check_positive("vision_dim", vision_dim), check_positive("lm_dim", lm_dim)
        self.width = self.lm_dim
        self.source = source
        self.num_prompts = None if num_prompts is None else check_positive("num_prompts", num_prompts)
        out = lm_dim * (self.num_prompts or 1) if source == "pooled" else lm_dim
        self.map = self._make_map(vision_dim, out)

    def _make_map(self, in_dim: int, out_dim: int) -> nn.Module:
        return nn.Linear(in_dim, out_dim)

    def forward(self, tokens: Tensor, pooled: Tensor) -> BridgeOutput:
        if self.source == "pooled":
            prompts = self.map(pooled).view(pooled.shape[0], -1, self.lm_dim)
        else:
            if self.num_prompts is not None and tokens.shape[1] != self.num_prompts:
                tokens = F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.num_prompts).transpose(1, 2)
            prompts = self.map(tokens)
        return BridgeOutput(prompts, prompts)


class MLPBridge(LinearBridge):
    """`LinearBridge` with a two-layer GELU MLP (hidden width ``hidden_dim``, default the LM width)."""

    kind = "mlp"

    def __init__(self, vision_dim: int, lm_dim: int, *, num_prompts: int | None = 2, source: str = "pooled",
                 hidden_dim: int | None = None) -> None:
        self.hidden_dim = check_positive("hidden_dim", hidden_dim or lm_dim)
        super().__init__(vision_dim, lm_dim, num_prompts=num_prompts, source=source)

    def _make_map(self, in_dim: int, out_dim: int) -> nn.Module:
        return nn.Sequential(nn.Linear(in_dim, self.hidden_dim), nn.GELU(), nn.Linear(self.hidden_dim, out_dim))


class PrefixMapper(Bridge):
    """ClipCap's mapping network from the pooled image feature to ``k`` prefix embeddings (module docstring)."""

    kind = "prefix"

    def __init__(self, vision_dim: int, lm_dim: int, *, num_prompts: int = 10, mapping: str = "mlp",
                 depth: int = 2, heads: int = 8, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if mapping not in PREFIX_MAPPINGS:
            raise ArchitectureError(f"model.stitched.options.mapping must be one of {PREFIX_MAPPINGS}, got {mapping!r}")
        self.vision_dim, self.lm_dim = check_positive("vision_dim", vision_dim), check_positive("lm_dim", lm_dim)
        self.width = self.lm_dim
        self.num_prompts, self.mapping = check_positive("num_prompts", num_prompts), mapping
        k = self.num_prompts
        self.grad_checkpointing = False
        if mapping == "mlp":
            hidden = max(1, k * lm_dim // 2)
            self.mlp = nn.Sequential(nn.Linear(vision_dim, hidden), nn.Tanh(), nn.Linear(hidden, k * lm_dim))
        else:
            if lm_dim % heads:
                raise ArchitectureError(f"model.stitched.options.heads={heads} must divide the LM width {lm_dim}")
            self.expand = nn.Linear(vision_dim, k * lm_dim)
            self.prefix_const = nn.Parameter(torch.randn(k, lm_dim))  # ClipCap: torch.randn
            self.layers = nn.ModuleList(Block(lm_dim, heads, mlp_ratio) for _ in range(check_positive("depth", depth)))

    def forward(self, tokens: Tensor, pooled: Tensor) -> BridgeOutput:
        b, k = pooled.shape[0], self.num_prompts
        if self.mapping == "mlp":
            prompts = self.mlp(pooled).view(b, k, self.lm_dim)
        else:
            x = self.expand(pooled).view(b, k, self.lm_dim)
            seq = torch.cat([x, self.prefix_const.to(x.dtype).expand(b, -1, -1)], dim=1)
            for layer in self.layers:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    seq = checkpoint(layer, seq, use_reentrant=False)
                else:
                    seq = layer(seq)
            prompts = seq[:, k:]
        return BridgeOutput(prompts, prompts)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"prefix_const"} if self.mapping == "transformer" else set()


def build_bridge(kind: str, vision_dim: int, lm_dim: int, **kwargs: Any) -> Bridge:
    """A bridge by kind name (``linear``, ``mlp``, ``prefix``, ``qformer``, ``flamingo``); ``kwargs`` go to its
    constructor (``flamingo`` also needs ``num_lm_layers``)."""
    from mmssl.architectures.stitching.flamingo import FlamingoBridge
    from mmssl.architectures.stitching.qformer import QFormer

    kinds: dict[str, type[Bridge]] = {c.kind: c for c in (LinearBridge, MLPBridge, PrefixMapper, QFormer,
                                                          FlamingoBridge)}
    if kind not in kinds:
        raise ArchitectureError(f"model.stitched.bridge must be one of {sorted(kinds)}, got {kind!r}")
    try:
        return kinds[kind](vision_dim, lm_dim, **kwargs)
    except TypeError as exc:
        raise ArchitectureError(f"model.stitched.options {sorted(kwargs)} do not fit bridge kind {kind!r}: {exc}") \
            from None

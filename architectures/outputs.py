"""Typed model outputs keyed by modality, and the model's spec (what objectives may size their heads from, and the
block they build their decoders from)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import Tensor, nn

from mmssl.architectures.layers.blocks import Block

VIEW_SEP = "@"  # "audio@1": a second augmented view of "audio", encoded by the audio tower


def tower_name(modality: str) -> str:
    """The tower that encodes a batch key: ``"audio@1" -> "audio"``."""
    return modality.split(VIEW_SEP, 1)[0]


class _ModelOutputFields(NamedTuple):
    embeddings: dict[str, Tensor]
    pooled: dict[str, Tensor]
    tokens: dict[str, Tensor]
    present: dict[str, Tensor]
    token_mask: dict[str, Tensor]
    fused: dict[str, Tensor]
    fusion_inputs: dict[str, Tensor]
    fusion_mask: dict[str, Tensor]


class ModelOutput(_ModelOutputFields):
    """What every architecture returns; objectives read the fields they declare they need.

    Attributes:
        embeddings: modality -> ``[B, E]`` projected embeddings (not normalised; objectives normalise).
        pooled: modality -> ``[B, D_m]`` pooled tower features (what a linear probe reads).
        tokens: modality -> ``[B, T_m, D_m]`` token states from ``forward_features`` (CNN feature maps are
            flattened to ``H·W`` tokens).
        token_mask: modality -> ``bool[B, T_m]``, True where a token is real (text padding is False).
        present: modality -> ``bool[B]``; rows whose modality is absent hold meaningless values.
        fused: fused token states ``[B, T_q, F]`` keyed by the query modality, for late-fusion and unified
            families (empty for fusion-free models).
        fusion_inputs / fusion_mask: what ``model.fuse`` takes for a modality where that is not ``tokens`` /
            ``token_mask`` (stitched models: the LM's input embeddings of the text and the bridge's soft prompts,
            since the frozen LM is conditioned on its inputs, not on its own output states).

    A named tuple of dicts (the optional fields default to fresh empty dicts), not a dataclass: DeepSpeed ZeRO-3
    finds a module's output tensors only inside tuples, lists and dicts, and hooks them to re-gather the module's
    partitioned parameters before its backward; a dataclass hides them, and a parameter the module's forward
    saved for backward is then read partitioned (size 0). Replace a field with ``_replace``.
    """

    __slots__ = ()

    def __new__(cls, embeddings: dict[str, Tensor], pooled: dict[str, Tensor], tokens: dict[str, Tensor],
                present: dict[str, Tensor], token_mask: dict[str, Tensor] | None = None,
                fused: dict[str, Tensor] | None = None, fusion_inputs: dict[str, Tensor] | None = None,
                fusion_mask: dict[str, Tensor] | None = None) -> ModelOutput:
        return super().__new__(cls, embeddings, pooled, tokens, present, _fresh(token_mask), _fresh(fused),
                               _fresh(fusion_inputs), _fresh(fusion_mask))


def _fresh(value: dict[str, Tensor] | None) -> dict[str, Tensor]:
    return {} if value is None else value


@dataclass
class ModelSpec:
    """Static facts about a built model (satisfies ``objectives.base.ModelSpec``). ``block`` is the factory of the
    transformer block objectives build their decoders from: `architectures.layers.blocks.Block`, called as
    ``block(width, heads, mlp_ratio, **options)``, so that attention is written once, in architectures."""

    family: str
    modalities: tuple[str, ...]
    embed_dim: int
    feature_dims: dict[str, int]
    token_dims: dict[str, int]
    fusion_dim: int | None = None
    vocab_sizes: dict[str, int] = field(default_factory=dict)
    special_tokens: dict[str, dict[str, int]] = field(default_factory=dict)
    # masked prediction (`architectures.masked_views`): the mask kinds each modality's plug-in draws (default first);
    # for each modality whose tower encodes a masked view, its token grid and the width P of its target [B, T, P]
    mask_kinds: dict[str, tuple[str, ...]] = field(default_factory=dict)
    mask_grids: dict[str, tuple[int, ...]] = field(default_factory=dict)
    mask_targets: dict[str, int] = field(default_factory=dict)
    block: Callable[..., nn.Module] = Block  # the decoder block factory (see the class docstring)

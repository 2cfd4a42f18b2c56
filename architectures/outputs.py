"""Typed model outputs, keyed by modality."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class ModelOutput:
    """What every architecture returns; objectives read the fields they declare they need.

    Attributes:
        embeddings: modality -> ``[B, E]`` projected embeddings (not normalised; objectives normalise).
        pooled: modality -> ``[B, D_m]`` pooled tower features (what a linear probe reads).
        tokens: modality -> ``[B, T_m, D_m]`` token states (or feature maps) from ``forward_features``.
        present: modality -> ``bool[B]``; rows whose modality is absent hold meaningless values.
        fused: fused representations, for late-fusion and unified families (empty for fusion-free models).
    """

    embeddings: dict[str, Tensor]
    pooled: dict[str, Tensor]
    tokens: dict[str, Tensor]
    present: dict[str, Tensor]
    fused: dict[str, Tensor] = field(default_factory=dict)

"""The objective contract.

An objective takes the model's outputs for a batch (dicts keyed by modality: ``embeddings``, ``pooled``,
``tokens``, ``present``, ``fused``) and returns a `LossOutput`. It declares what it needs in `Requirements`, so a
recipe whose model cannot provide it fails before launch with a message naming both sides.

Objectives see model outputs structurally (`ModelOutputs` protocol): nothing here imports an architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn


class ObjectiveError(ValueError):
    """An objective configured in a way that cannot work (bad pair, missing modality, bad hyper-parameter)."""


class ModelOutputs(Protocol):
    embeddings: dict[str, Tensor]
    pooled: dict[str, Tensor]
    tokens: dict[str, Tensor]
    present: dict[str, Tensor]
    fused: dict[str, Tensor]


@dataclass
class LossOutput:
    """``loss``: the scalar to minimise on this rank; ``terms``: named sub-losses (detached, for logging);
    ``metrics``: further logged scalars (detached)."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Requirements:
    modalities: tuple[str, ...] = ()
    needs_fusion: bool = False
    needs_decoder: bool = False
    needs_pseudo_labels: bool = False
    gathers_across_ranks: bool = False


class Objective(nn.Module):
    """Base class: subclasses set ``requires`` and implement ``forward(outputs, batch)``."""

    requires: Requirements

    def forward(self, outputs: ModelOutputs, batch: Any = None) -> LossOutput:
        raise NotImplementedError

    def check(self, available_modalities: Mapping[str, Any] | list[str], where: str) -> None:
        """Raise `ObjectiveError` naming ``where`` when the model lacks a modality this objective needs."""
        missing = [m for m in self.requires.modalities if m not in available_modalities]
        if missing:
            raise ObjectiveError(
                f"{where} needs modality {missing[0]!r}, which the model does not have "
                f"(model towers: {sorted(available_modalities)})"
            )

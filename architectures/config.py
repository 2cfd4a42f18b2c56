"""The ``model:`` section of a recipe, and building a model from it.

Besides its own fields, ``model:`` takes one key per modality (``audio:``, ``text:``, ``image:``, ...), each parsed
into that modality plug-in's tower config, so ``model.audio.depth=2`` on the command line reaches the audio tower.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from architectures.fusion_free import FusionFreeModel
from architectures.heads import HEAD_KINDS, ProjectionHead
from architectures.modalities import MODALITIES, TowerConfig, get_modality
from architectures.towers import ArchitectureError

FAMILIES = ("fusion_free",)


@dataclass
class ModelConfig:
    family: str = "fusion_free"
    embed_dim: int = 256
    head: str = "linear"
    towers: dict[str, TowerConfig] = field(default_factory=dict)

    # Keys of `model:` that are not fields are modality names; their values parse into the plug-in's config.
    EXTRA_KEYS_FIELD: ClassVar[str] = "towers"

    @staticmethod
    def extra_key_type(key: str) -> type | None:
        plugin = MODALITIES.get(key)
        return plugin.config_cls if plugin is not None else None

    @staticmethod
    def extra_key_names() -> list[str]:
        return sorted(MODALITIES)

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise ArchitectureError(f"model.family must be one of {FAMILIES}, got {self.family!r}")
        if self.head not in HEAD_KINDS:
            raise ArchitectureError(f"model.head must be one of {HEAD_KINDS}, got {self.head!r}")
        if not self.towers:
            raise ArchitectureError(f"model has no tower; add at least one of {self.extra_key_names()}")
        if self.embed_dim < 1:
            raise ArchitectureError(f"model.embed_dim must be >= 1, got {self.embed_dim}")


def build_model(cfg: ModelConfig, *, seed: int | None = None) -> FusionFreeModel:
    """Build the model; with ``seed``, parameter initialisation is reproducible."""
    cfg.validate()
    if seed is not None:
        torch.manual_seed(seed)
    towers, heads = {}, {}
    for name, tower_cfg in cfg.towers.items():
        tower = get_modality(name).build_tower(tower_cfg)
        if tower_cfg.grad_checkpointing:
            tower.set_grad_checkpointing(True)
        if tower_cfg.frozen:
            tower.requires_grad_(False)
        towers[name] = tower
        heads[name] = ProjectionHead(tower.num_features, cfg.embed_dim, cfg.head)
    return FusionFreeModel(towers, heads)


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable}

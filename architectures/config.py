"""The ``model:`` section of a recipe, and building a model from it.

Besides its own fields, ``model:`` takes one key per modality (``audio:``, ``text:``, ``image:``, ...), each parsed
into that modality plug-in's tower config, so ``model.audio.depth=2`` on the command line reaches the audio tower.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from architectures.fusion import CrossAttentionFusion
from architectures.fusion_free import FusionFreeModel
from architectures.heads import HEAD_KINDS, ProjectionHead
from architectures.late_fusion import LateFusionModel
from architectures.modalities import MODALITIES, TowerConfig, get_modality
from architectures.outputs import ModelSpec
from architectures.towers import ArchitectureError, TimmTower

FAMILIES = ("fusion_free", "late_fusion")


@dataclass
class FusionConfig:
    """``model.fusion`` (late_fusion): ``query``'s tokens attend to the other modalities' tokens."""

    query: str = "text"
    width: int = 256
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0


@dataclass
class ModelConfig:
    family: str = "fusion_free"
    embed_dim: int = 256
    head: str = "linear"
    fusion: FusionConfig = field(default_factory=FusionConfig)
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
        if self.family == "late_fusion":
            if self.fusion.query not in self.towers:
                raise ArchitectureError(f"model.fusion.query={self.fusion.query!r} names no tower "
                                        f"(towers: {sorted(self.towers)})")
            if len(self.towers) < 2:
                raise ArchitectureError("model.family=late_fusion needs at least two towers")


def build_model(cfg: ModelConfig, *, seed: int | None = None) -> FusionFreeModel:
    """Build the model (its ``spec`` set); with ``seed``, parameter initialisation is reproducible."""
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
    if cfg.family == "late_fusion":
        f = cfg.fusion
        fusion = CrossAttentionFusion({m: t.num_features for m, t in towers.items()}, width=f.width, depth=f.depth,
                                      heads=f.heads, mlp_ratio=f.mlp_ratio, dropout=f.dropout)
        model: FusionFreeModel = LateFusionModel(towers, heads, fusion, f.query)
    else:
        model = FusionFreeModel(towers, heads)
    model.spec = model_spec(cfg, towers)
    return model


def model_spec(cfg: ModelConfig, towers: dict[str, Any]) -> ModelSpec:
    """Sizes objectives build their heads from: widths, vocabularies and special tokens, maskable patch shapes."""
    spec = ModelSpec(
        family=cfg.family,
        modalities=tuple(towers),
        embed_dim=cfg.embed_dim,
        feature_dims={m: int(t.num_features) for m, t in towers.items()},
        token_dims={m: int(t.num_features) for m, t in towers.items()},
        fusion_dim=cfg.fusion.width if cfg.family == "late_fusion" else None,
    )
    for m, tower_cfg in cfg.towers.items():
        plugin = get_modality(m)
        tokenizer = getattr(plugin, "tokenizer", None)
        if tokenizer is not None:
            tok = tokenizer(tower_cfg)
            spec.vocab_sizes[m] = int(tok.vocab_size)
            spec.special_tokens[m] = tok.special_ids()
        tower = towers[m]
        if isinstance(tower, TimmTower) and tower.patch_shape() is not None:
            spec.patch_shapes[m] = tower.patch_shape()
    return spec


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable}

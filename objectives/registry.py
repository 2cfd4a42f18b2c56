"""Objective kinds by name, and the ``objectives:`` section of a recipe.

Each key of ``objectives:`` is an objective kind (``contrastive``) or a kind with a suffix (``contrastive_av``),
so one recipe can hold several objectives of the same kind; every entry has a ``weight``. The total loss is
``Σ_i weight_i · L_i``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mmssl.objectives.autoregressive import PrefixLMConfig, PrefixLMObjective
from mmssl.objectives.base import ModelSpec, Objective, ObjectiveError
from mmssl.objectives.captioning import CaptioningConfig, CaptioningObjective
from mmssl.objectives.clustering import ClusteringConfig, ClusteringObjective, SwapClusteringObjective, SwAVConfig
from mmssl.objectives.contrastive import ContrastiveConfig, ContrastiveObjective
from mmssl.objectives.factorcl import FactorCLConfig, FactorCLObjective
from mmssl.objectives.intramodal import IntraModalConfig, IntraModalObjective
from mmssl.objectives.joint_mae import JointMAEConfig, JointMAEObjective
from mmssl.objectives.masked import (
    CrossMLMConfig,
    CrossModalMLMObjective,
    MAEConfig,
    MAEObjective,
    MaskedClusterConfig,
    MaskedClusterObjective,
    MLMConfig,
    MLMObjective,
)
from mmssl.objectives.matching import MatchingConfig, MatchingObjective
from mmssl.objectives.momentum import MomentumContrastiveConfig, MomentumContrastiveObjective
from mmssl.objectives.siglip import SigLIPConfig, SigLIPObjective

# kind -> (config dataclass, factory(config, model spec) -> objective)
OBJECTIVES: dict[str, tuple[type, Callable[[Any, ModelSpec], Objective]]] = {
    "captioning": (CaptioningConfig, CaptioningObjective.from_config),
    "clustering": (ClusteringConfig, ClusteringObjective.from_config),
    "contrastive": (ContrastiveConfig, ContrastiveObjective.from_config),
    "factorcl": (FactorCLConfig, FactorCLObjective.from_config),
    "intramodal": (IntraModalConfig, IntraModalObjective.from_config),
    "joint_mae": (JointMAEConfig, JointMAEObjective.from_config),
    "mae": (MAEConfig, MAEObjective.from_config),
    "masked_cluster": (MaskedClusterConfig, MaskedClusterObjective.from_config),
    "masked_cross": (CrossMLMConfig, CrossModalMLMObjective.from_config),
    "matching": (MatchingConfig, MatchingObjective.from_config),
    "mlm": (MLMConfig, MLMObjective.from_config),
    "momentum_contrastive": (MomentumContrastiveConfig, MomentumContrastiveObjective.from_config),
    "prefix_lm": (PrefixLMConfig, PrefixLMObjective.from_config),
    "siglip": (SigLIPConfig, SigLIPObjective.from_config),
    "swav": (SwAVConfig, SwapClusteringObjective.from_config),
}


def kind_of(name: str) -> str | None:
    for kind in sorted(OBJECTIVES, key=len, reverse=True):
        if name == kind or name.startswith(kind + "_"):
            return kind
    return None


@dataclass
class ObjectivesConfig:
    terms: dict[str, Any] = field(default_factory=dict)

    EXTRA_KEYS_FIELD: ClassVar[str] = "terms"

    @staticmethod
    def extra_key_type(key: str) -> type | None:
        kind = kind_of(key)
        return OBJECTIVES[kind][0] if kind else None

    @staticmethod
    def extra_key_names() -> list[str]:
        return sorted(OBJECTIVES) + [f"{k}_<suffix>" for k in sorted(OBJECTIVES)]


def build_objectives(cfg: ObjectivesConfig, spec: ModelSpec) -> tuple[dict[str, Objective], dict[str, float]]:
    """Build every objective of the recipe for a model with ``spec``, and check each against it (a requirement
    the model cannot meet raises `ObjectiveError` naming ``objectives.<name>``)."""
    if not cfg.terms:
        raise ObjectiveError(f"the recipe has no objective; add one of {sorted(OBJECTIVES)} under `objectives:`")
    built: dict[str, Objective] = {}
    weights: dict[str, float] = {}
    for name, term_cfg in cfg.terms.items():
        kind = kind_of(name)
        if kind is None:
            raise ObjectiveError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
        where = f"objectives.{name}"
        try:
            objective = OBJECTIVES[kind][1](term_cfg, spec)
        except ObjectiveError as exc:
            if str(exc).startswith(where):
                raise
            raise ObjectiveError(f"{where}: {exc}") from None
        objective.check(spec, where=where)
        built[name] = objective
        weights[name] = float(term_cfg.weight)
    return built, weights

"""Objective kinds by name, and the ``objectives:`` section of a recipe.

Each key of ``objectives:`` is an objective kind (``contrastive``) or a kind with a suffix (``contrastive_av``),
so one recipe can hold several objectives of the same kind; every entry has a ``weight``. The total loss is
``Σ_i weight_i · L_i``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from objectives.base import Objective, ObjectiveError
from objectives.contrastive import ContrastiveConfig, ContrastiveObjective

OBJECTIVES: dict[str, tuple[type, Callable[[Any], Objective]]] = {
    "contrastive": (ContrastiveConfig, ContrastiveObjective.from_config),
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


def build_objectives(cfg: ObjectivesConfig) -> tuple[dict[str, Objective], dict[str, float]]:
    if not cfg.terms:
        raise ObjectiveError(f"the recipe has no objective; add one of {sorted(OBJECTIVES)} under `objectives:`")
    built: dict[str, Objective] = {}
    weights: dict[str, float] = {}
    for name, term_cfg in cfg.terms.items():
        kind = kind_of(name)
        if kind is None:
            raise ObjectiveError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
        built[name] = OBJECTIVES[kind][1](term_cfg)
        weights[name] = float(term_cfg.weight)
    return built, weights

"""Registered modality plug-ins, by name."""

from __future__ import annotations

from architectures.modalities.audio import AudioConfig, AudioPlugin
from architectures.modalities.base import ModalityPlugin, TowerConfig
from architectures.modalities.image import ImageConfig, ImagePlugin
from architectures.modalities.text import TextConfig, TextPlugin
from architectures.towers import ArchitectureError

MODALITIES: dict[str, ModalityPlugin] = {p.name: p for p in (AudioPlugin(), TextPlugin(), ImagePlugin())}


def get_modality(name: str) -> ModalityPlugin:
    try:
        return MODALITIES[name]
    except KeyError:
        raise ArchitectureError(f"unknown modality {name!r}; registered: {sorted(MODALITIES)}") from None


__all__ = [
    "MODALITIES",
    "AudioConfig",
    "ImageConfig",
    "ModalityPlugin",
    "TextConfig",
    "TowerConfig",
    "get_modality",
]

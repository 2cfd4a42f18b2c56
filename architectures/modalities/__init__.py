"""Registered modality plug-ins, by name, discovered automatically.

Every module of this package is imported (`pkgutil`) and every concrete `ModalityPlugin` subclass it defines is
registered under its ``name``: adding a modality means adding one file here. Two classes claiming one name are an
error.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterable

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.modalities.audio import AudioConfig
from mmssl.architectures.modalities.base import ModalityPlugin, TowerConfig
from mmssl.architectures.modalities.image import ImageConfig
from mmssl.architectures.modalities.text import TextConfig


def discover_plugins(paths: Iterable[str], package: str) -> dict[str, ModalityPlugin]:
    """name -> plug-in instance for every concrete `ModalityPlugin` subclass defined in the modules of ``package``
    (found on ``paths``), modules in name order."""
    found: dict[str, ModalityPlugin] = {}
    for info in sorted(pkgutil.iter_modules(list(paths)), key=lambda i: i.name):
        module = importlib.import_module(f"{package}.{info.name}")
        for obj in vars(module).values():
            if not (isinstance(obj, type) and issubclass(obj, ModalityPlugin)) or inspect.isabstract(obj):
                continue
            if obj.__module__ != module.__name__ or not isinstance(getattr(obj, "name", None), str):
                continue  # imported from elsewhere, or an intermediate base without a name
            if obj.name in found:
                first = type(found[obj.name])
                raise ArchitectureError(f"modality {obj.name!r} is defined twice: by {first.__module__}."
                                        f"{first.__qualname__} and by {module.__name__}.{obj.__qualname__}")
            found[obj.name] = obj()
    return found


MODALITIES: dict[str, ModalityPlugin] = discover_plugins(__path__, __name__)


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
    "discover_plugins",
    "get_modality",
]

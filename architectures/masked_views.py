"""The model's side of masked prediction: what ``objectives.base.MultimodalModel`` declares as ``mask``, ``target``
and ``encode_masked``, the same for every family.

* ``mask(m, x, ratio, generator, kind=..., span_length=...)``: ``bool[B, T]`` (True = masked) from modality ``m``'s
  plug-in (`ModalityPlugin.mask`, its generators in `architectures.modalities.masking`), over the ``T`` tokens of
  its masked view; drawn where ``x`` lives, so an objective passes the host batch's ``x`` and nothing waits for the
  device. ``kind`` is one of the plug-in's `mask_kinds` (``spec.mask_kinds[m]``; default the first).
* ``target(m, x)``: the plug-in's per-token reconstruction target ``[B, T, P]`` (``P = spec.mask_targets[m]``;
  text: its ids), aligned with the mask's tokens.
* ``encode_masked(m, x, mask, mask_token=..., visible=...)``: the token states of ``m``'s tower under the towers'
  masked-forward contract (`architectures.towers.Tower.forward`: replace mode with ``mask_token``, drop mode with
  ``visible``), for the modalities in ``spec.mask_targets``; called through the tower module, so its hooks (ZeRO-3's
  parameter gathering) fire.

A view ``"m@1"`` is masked, targeted and encoded as ``m``. Models get the plug-in configurations these read from
their builder (`architectures.config.build_model` sets ``tower_configs``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.modalities import get_modality
from mmssl.architectures.modalities.base import ModalityPlugin, TowerConfig
from mmssl.architectures.modalities.masking import Generators
from mmssl.architectures.outputs import tower_name


class MaskedViews:
    """Mixin for the model families (module docstring)."""

    tower_configs: Mapping[str, TowerConfig] = {}

    def _plugin(self, modality: str) -> tuple[ModalityPlugin, TowerConfig]:
        name = tower_name(modality)
        if name not in self.tower_configs:
            raise ArchitectureError(f"the model has no configuration for modality {name!r} to mask (configured: "
                                    f"{sorted(self.tower_configs)}; models built by build_model have one per tower)")
        return get_modality(name), self.tower_configs[name]

    def mask(self, modality: str, x: Any, ratio: float, generator: Generators = None, *, kind: str | None = None,
             span_length: int = 1) -> Tensor:
        plugin, cfg = self._plugin(modality)
        return plugin.mask(cfg, x, ratio, generator, kind=kind, span_length=span_length)

    def target(self, modality: str, x: Any) -> Tensor:
        plugin, cfg = self._plugin(modality)
        return plugin.target(cfg, x)

    def encode_masked(self, modality: str, x: Any, mask: Tensor, *, mask_token: Tensor | None = None,
                      visible: int | None = None) -> Tensor:
        name = tower_name(modality)
        towers = getattr(self, "towers", None)
        tower = towers[name] if towers is not None and name in towers else None
        if tower is None or not tower.encodes_masked_views():
            raise ArchitectureError(f"model.family={getattr(self, 'family', '?')!r}: modality {name!r} has no tower "
                                    "that encodes a masked view")
        return tower(x, mask=mask, mask_token=mask_token, visible=visible).features

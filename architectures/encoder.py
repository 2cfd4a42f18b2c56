"""One exported encoder: tower + projection head + preprocessing, in a directory of its own.

Layout written by `save_encoder` (format version 1)::

    <dir>/model.safetensors   the tower, in its library's own key space
    <dir>/config.json         the library's config (timm: architecture/model_args and the preprocessing in
                              pretrained_cfg; transformers: its config), plus an "mmssl" section: modality, tower
                              config (with the resolved preprocessing, `ModalityPlugin.export_assets`: an image
                              tower's size, mean/std, crop), embed_dim, head kind, param_layout
                              (`architectures.layers.legacy`; a tower's own keys are its library's)
    <dir>/head.safetensors    the projection head (``proj.*``)
    <dir>/tokenizer.model | tokenizer.json   for text encoders

The tower loads without mmssl through ``timm.create_model("local-dir:<dir>")`` or
``transformers.AutoModel.from_pretrained("<dir>")``; `Encoder.from_dir` loads tower, head and preprocessing with
this module alone (no training code).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmssl.architectures.heads import ProjectionHead
from mmssl.architectures.layers.legacy import PARAM_LAYOUT
from mmssl.architectures.modalities import get_modality
from mmssl.architectures.modalities.base import DecoderFn, TowerConfig
from mmssl.architectures.towers import ArchitectureError, Tower

FORMAT_VERSION = 1
HEAD_FILE = "head.safetensors"


def save_encoder(out_dir: str | Path, modality: str, cfg: TowerConfig, tower: Tower, head: ProjectionHead,
                 embed_dim: int) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plugin = get_modality(modality)
    overrides = plugin.export_assets(cfg, out)
    tower_cfg = {**dataclasses.asdict(cfg), **overrides, "pretrained": None}
    extra = {
        "format_version": FORMAT_VERSION,
        "param_layout": PARAM_LAYOUT,
        "modality": modality,
        "embed_dim": embed_dim,
        "head": head.kind,
        "num_features": tower.num_features,
        "tower": tower_cfg,
    }
    tower.save_native(out, extra)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(out / HEAD_FILE))
    return out


class Encoder(nn.Module):
    """A reloaded encoder: ``forward(x)`` gives ``(pooled features, embedding)``."""

    def __init__(self, modality: str, cfg: TowerConfig, tower: Tower, head: ProjectionHead, embed_dim: int,
                 source: Path) -> None:
        super().__init__()
        self.modality = modality
        self.embed_dim = embed_dim
        self.cfg = cfg
        self.tower = tower
        self.head = head
        self.source = source

    @classmethod
    def from_dir(cls, path: str | Path, *, random_init: bool = False, seed: int = 0) -> Encoder:
        """Load an exported encoder; with ``random_init`` build the same architecture with fresh weights
        (seeded), the floor every evaluation reports beside the pretrained numbers."""
        src = Path(path)
        meta = read_meta(src)
        plugin = get_modality(meta["modality"])
        fields = {f.name for f in dataclasses.fields(plugin.config_cls)}
        raw = {k: v for k, v in meta["tower"].items() if k in fields}
        for f in dataclasses.fields(plugin.config_cls):
            if f.metadata.get("path") and raw.get(f.name):
                raw[f.name] = str(src / raw[f.name])
        cfg = plugin.config_cls(**raw)
        cfg.pretrained = None if random_init else str(src)
        if random_init:
            torch.manual_seed(seed)
        tower = plugin.build_tower(cfg)
        embed_dim = int(meta["embed_dim"])
        head = ProjectionHead(tower.num_features, embed_dim, meta["head"])
        if not random_init:
            head.load_state_dict(load_file(str(src / HEAD_FILE)))
        return cls(meta["modality"], cfg, tower, head, embed_dim, src).eval()

    def decoder(self) -> DecoderFn:
        """The evaluation-time preprocessing (no augmentation) for raw shard bytes."""
        return get_modality(self.modality).decoder(self.cfg, train=False)

    def forward(self, x: Any) -> tuple[Tensor, Tensor]:
        pooled = self.tower(x).pooled
        return pooled, self.head(pooled)


def read_meta(path: str | Path) -> dict[str, Any]:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ArchitectureError(f"not an exported encoder: {cfg_file} is missing")
    meta = json.loads(cfg_file.read_text()).get("mmssl")
    if not isinstance(meta, dict) or "modality" not in meta:
        raise ArchitectureError(f"{cfg_file} has no 'mmssl' section; was it written by `mmssl export`?")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ArchitectureError(f"{cfg_file} uses export format {meta['format_version']}, newer than this mmssl")
    return meta

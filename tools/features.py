"""Frozen-encoder feature extraction over shards, cached on disk.

Features are computed once per (encoder weights, shards, initialisation) and stored as
``<encoder>/feature_cache/<digest>.safetensors`` (pooled features and projected embeddings) with a JSON sidecar
(sample keys and metadata); later probes and retrieval runs read the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmssl.architectures.encoder import Encoder
from mmssl.architectures.modalities import get_modality
from mmssl.data_pipelines.shards import resolve_shards
from mmssl.data_pipelines.stream import read_once

CACHE_DIR = "feature_cache"


@dataclass
class Features:
    pooled: torch.Tensor  # [N, D] tower features (what a linear probe reads)
    embeddings: torch.Tensor  # [N, E] projected embeddings (what retrieval compares)
    keys: list[str]
    meta: dict[str, list[Any]]
    present: torch.Tensor  # bool [N]: the sample carried this modality and it decoded
    data_errors: dict[str, int]


def cache_key(source: Path, weight_files: tuple[str, ...], urls: list[str], *settings: object) -> str:
    """Cache key of features: the weight files' sizes and mtimes, the shards (and their mtimes), ``settings``."""
    h = hashlib.sha1()
    for name in weight_files:
        path = source / name
        if path.exists():
            st = path.stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for url in urls:
        h.update(url.encode())
        if os.path.exists(url):
            h.update(str(os.stat(url).st_mtime_ns).encode())
    h.update(repr(settings).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def extract(encoder_dir: str | Path, shards: str | list[str], *, where: str = "--shards", random_init: bool = False,
            seed: int = 0, batch_size: int = 64, field_exts: list[str] | None = None, cache: bool = True) -> Features:
    """Encode every sample of ``shards`` with the exported encoder (or its random-init twin)."""
    src = Path(encoder_dir)
    urls = resolve_shards(shards, where=where)
    key = cache_key(src, ("model.safetensors", "head.safetensors", "config.json"), urls, random_init, seed)
    cache_file = src / CACHE_DIR / f"{key}.safetensors"
    if cache and cache_file.exists():
        tensors = load_file(str(cache_file))
        side = json.loads(cache_file.with_suffix(".json").read_text())
        return Features(tensors["pooled"], tensors["embeddings"], side["keys"], side["meta"],
                        tensors["present"].bool(), side["data_errors"])
    encoder = Encoder.from_dir(src, random_init=random_init, seed=seed)
    modality = encoder.modality
    exts = field_exts or list(get_modality(modality).extensions)
    pooled, embeddings, present, keys = [], [], [], []
    meta: dict[str, list[Any]] = {}
    errors: dict[str, int] = {}
    count = 0
    for batch in read_once(urls, fields={modality: exts}, decoders={modality: encoder.decoder()},
                           batch_size=batch_size, where=where):
        for k, v in batch.stats.items():
            errors[k] = errors.get(k, 0) + v
        n = len(batch)
        if modality in batch.inputs:
            p, e = encoder(batch.inputs[modality])
        else:
            p, e = torch.zeros(n, encoder.tower.num_features), torch.zeros(n, encoder.embed_dim)
        pooled.append(p.float())
        embeddings.append(e.float())
        present.append(batch.present[modality])
        keys.extend(batch.keys)
        for k in set(meta) | set(batch.meta):
            meta.setdefault(k, [None] * count).extend(batch.meta.get(k, [None] * n))
        count += n
    feats = Features(torch.cat(pooled), torch.cat(embeddings), keys, meta, torch.cat(present), errors)
    if cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.name + ".part")
        save_file({"pooled": feats.pooled.contiguous(), "embeddings": feats.embeddings.contiguous(),
                   "present": feats.present.to(torch.uint8)}, str(tmp))
        cache_file.with_suffix(".json").write_text(json.dumps({"keys": keys, "meta": meta, "data_errors": errors}))
        os.replace(tmp, cache_file)
    return feats

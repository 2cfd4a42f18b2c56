"""Features of a whole exported model (any family) over shards, per modality and fused, cached on disk.

One pass over the shards gives, for every sample: each modality's pooled tower features and projected embedding,
the presence of each modality, and the **fused feature**: the fused summary state (the query modality's first
token; a stitched causal LM's last real token — `objectives.base.fused_summary`) for models with a fusion module
(late fusion, unified, stitched; the state the ITM head reads), or the
concatenation of the modalities' pooled features for fusion-free models (late concatenation). Evaluations under
noise re-read the shards with a corrupted decoder (`ModalityPlugin.corrupted_decoder`), or with a modality
removed (``present`` all False: the models' missing-modality path, zeros for that modality, no NaN).

Cache: ``<model dir>/feature_cache/<digest>.safetensors`` + ``.json`` keyed by the weight files, the shards,
the random-init seed, the corruption and the removed modality.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmssl.architectures.modalities import get_modality
from mmssl.data_pipelines.shards import resolve_shards
from mmssl.data_pipelines.stream import read_once
from mmssl.objectives.base import fused_summary, fusion_view
from mmssl.tools.exported_model import CONFIG, ITM_HEAD, WEIGHTS, LoadedModel
from mmssl.tools.features import CACHE_DIR, cache_key

FUSED = "fused"
FEATURES_FORMAT = 2  # part of the cache key: bump when what a feature holds changes (2: fused summary, fusion view)


@dataclass(frozen=True)
class Corruption:
    """Noise applied to one modality while decoding (``level`` in [0, 1]), or the modality removed."""

    modality: str
    kind: str  # a plug-in corruption name, or "removed"
    level: float = 1.0

    def tag(self) -> str:
        return f"{self.modality}:{self.kind}:{self.level:g}"


@dataclass
class ModelFeatures:
    keys: list[str]
    meta: dict[str, list[Any]]
    pooled: dict[str, Tensor]  # modality -> [N, D_m]
    embeddings: dict[str, Tensor]  # modality -> [N, E]
    present: dict[str, Tensor]  # modality -> bool [N]
    fused: Tensor | None  # [N, F]; rows valid where `fused_present`
    fused_present: Tensor | None
    data_errors: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, Tensor] = field(default_factory=dict)  # kept only when asked (ITM re-ranking)
    token_mask: dict[str, Tensor] = field(default_factory=dict)


def fusion_query(loaded: LoadedModel) -> str | None:
    cfg = loaded.config
    if cfg.family == "late_fusion":
        return cfg.fusion.query
    if cfg.family == "unified":
        return cfg.unified.query if cfg.unified.fusion_depth > 0 and len(cfg.towers) > 1 else None
    if cfg.family == "stitched":
        return "text" if cfg.stitched.fuse_text else None
    return None


def _pad_cat(chunks: list[Tensor]) -> Tensor:
    """Concatenate ``[b, T_i, ...]`` chunks along the batch, right-padding T to the longest (zeros / False)."""
    if chunks[0].ndim < 2:
        return torch.cat(chunks)
    length = max(c.shape[1] for c in chunks)
    padded = []
    for c in chunks:
        pad = torch.zeros((c.shape[0], length - c.shape[1], *c.shape[2:]), dtype=c.dtype)
        padded.append(torch.cat([c, pad], 1))
    return torch.cat(padded)


@torch.no_grad()
def extract_model_features(loaded: LoadedModel, shards: str | list[str], *, where: str = "--shards",
                           modalities: list[str] | None = None, random_init: bool = False, seed: int = 0,
                           corruption: Corruption | None = None, batch_size: int = 64, keep_tokens: bool = False,
                           cache: bool = True) -> ModelFeatures:
    """Encode every sample of ``shards`` with ``loaded`` (see the module docstring)."""
    names = list(modalities or loaded.modalities)
    for m in names:
        loaded.check_modality(m, where)
    if corruption is not None:
        loaded.check_modality(corruption.modality, "--corrupt")
    urls = resolve_shards(shards, where=where)
    key = cache_key(loaded.source, (WEIGHTS, ITM_HEAD, CONFIG), urls, FEATURES_FORMAT, random_init, seed, names,
                    keep_tokens, corruption.tag() if corruption else "clean")
    cache_file = loaded.source / CACHE_DIR / f"{key}.safetensors"
    if cache and cache_file.exists():
        return _read_cache(cache_file, names)
    decoders = loaded.decoders(names)
    if corruption is not None and corruption.kind != "removed":
        plugin = get_modality(corruption.modality)
        decoders[corruption.modality] = plugin.corrupted_decoder(loaded.config.towers[corruption.modality],
                                                                 corruption.kind, corruption.level)
    query = fusion_query(loaded)
    parts: dict[str, list[Tensor]] = {}
    keys: list[str] = []
    meta: dict[str, list[Any]] = {}
    errors: dict[str, int] = {}
    count = 0
    for batch in read_once(urls, fields=loaded.fields(names), decoders=decoders, batch_size=batch_size,
                           where=where):
        for k, v in batch.stats.items():
            errors[k] = errors.get(k, 0) + v
        n = len(batch)
        present = {m: batch.present[m].clone() for m in names}
        if corruption is not None and corruption.kind == "removed":
            present[corruption.modality][:] = False
        inputs = {m: batch.inputs[m] for m in names if m in batch.inputs}
        out = loaded.model(inputs, {m: present[m] for m in inputs})
        for m in names:
            if m in out.embeddings:
                pooled, emb = out.pooled[m].float(), out.embeddings[m].float()
                pooled = pooled * present[m][:, None]
                emb = emb * present[m][:, None]
            else:
                pooled = torch.zeros(n, loaded.model.spec.feature_dims[m])
                emb = torch.zeros(n, loaded.model.spec.embed_dim)
            parts.setdefault(f"pooled.{m}", []).append(pooled)
            parts.setdefault(f"embeddings.{m}", []).append(emb)
            parts.setdefault(f"present.{m}", []).append(present[m])
            if keep_tokens and m in out.tokens:  # as `fuse` takes them, for ITM re-ranking
                states, mask = fusion_view(out, m)
                parts.setdefault(f"tokens.{m}", []).append(states.float())
                parts.setdefault(f"token_mask.{m}", []).append(mask)
        fused, fused_present = _fused(loaded.model, out, query, names, present, n)
        if fused is not None:
            parts.setdefault(FUSED, []).append(fused)
            parts.setdefault("fused_present", []).append(fused_present)
        keys.extend(batch.keys)
        for k in set(meta) | set(batch.meta):
            meta.setdefault(k, [None] * count).extend(batch.meta.get(k, [None] * n))
        count += n
    tensors = {k: _pad_cat(v) for k, v in parts.items()}
    if cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.name + ".part")
        save_file({k: (v.to(torch.uint8) if v.dtype == torch.bool else v).contiguous() for k, v in tensors.items()},
                  str(tmp))
        cache_file.with_suffix(".json").write_text(json.dumps({"keys": keys, "meta": meta, "data_errors": errors}))
        os.replace(tmp, cache_file)
    return _assemble(tensors, keys, meta, errors, names)


def _fused(model: Any, out: Any, query: str | None, names: list[str], present: dict[str, Tensor], n: int
           ) -> tuple[Tensor | None, Tensor | None]:
    if len(names) < 2:
        return None, None
    all_present = torch.stack([present[m] for m in names]).all(0)
    if query is not None and query in out.fused:
        fused = out.fused[query]
        mask = out.token_mask.get(query, torch.ones(fused.shape[:2], dtype=torch.bool))
        return fused_summary(model, fused, mask.bool()[:, : fused.shape[1]]).float(), all_present
    if query is None:  # fusion-free: late concatenation of the pooled features (absent modality -> zeros)
        pooled = [out.pooled[m].float() * present[m][:, None] if m in out.pooled else None for m in names]
        if any(p is None for p in pooled):
            return None, None
        return torch.cat(pooled, -1), all_present
    return None, None


def _read_cache(cache_file: Path, names: list[str]) -> ModelFeatures:
    tensors = load_file(str(cache_file))
    side = json.loads(cache_file.with_suffix(".json").read_text())
    tensors = {k: (v.bool() if k.startswith(("present.", "token_mask.")) or k == "fused_present" else v)
               for k, v in tensors.items()}
    return _assemble(tensors, side["keys"], side["meta"], side["data_errors"], names)


def _assemble(tensors: dict[str, Tensor], keys: list[str], meta: dict[str, list[Any]], errors: dict[str, int],
              names: list[str]) -> ModelFeatures:
    return ModelFeatures(
        keys=keys, meta=meta, data_errors=errors,
        pooled={m: tensors[f"pooled.{m}"] for m in names},
        embeddings={m: tensors[f"embeddings.{m}"] for m in names},
        present={m: tensors[f"present.{m}"].bool() for m in names},
        fused=tensors.get(FUSED), fused_present=tensors["fused_present"].bool() if "fused_present" in tensors else None,
        tokens={m: tensors[f"tokens.{m}"] for m in names if f"tokens.{m}" in tensors},
        token_mask={m: tensors[f"token_mask.{m}"].bool() for m in names if f"token_mask.{m}" in tensors},
    )

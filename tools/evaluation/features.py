"""Features over shards, cached on disk: the one extractor behind ``mmssl evaluate``, ``probe`` and ``retrieval``.

Two sources: a whole exported model (any family: `extract_model_features`) or one exported encoder (a tower + its
projection head: `extract`); both read the shards once through `read_features` (keys, metadata, data errors,
per-batch tensors) and keep the result through one cache (`cached`).

One pass over the shards gives, for every sample: each modality's pooled tower features and projected embedding,
the presence of each modality, and the **fused feature**: the fused summary state (the query modality's first
token; a stitched causal LM's last real token — `objectives.base.fused_summary`) for models with a fusion module
(late fusion, unified, stitched; the state the ITM head reads), or the
concatenation of the modalities' pooled features for fusion-free models (late concatenation). Evaluations under
noise re-read the shards with a corrupted decoder (`ModalityPlugin.corrupted_decoder`), or with a modality
removed (``present`` all False: the models' missing-modality path, zeros for that modality, no NaN).

Cache: ``<model or encoder dir>/feature_cache/<digest>.safetensors`` + ``.json`` keyed by the weight files (sizes
and mtimes), the shards (and their mtimes), the random-init seed, the corruption and the removed modality, and
what of the `Runtime` can change the numbers (device type, precision, batch size; not the worker count).

Scale (`tools.evaluation.runtime.Runtime`): the model runs on ``runtime.device`` (under bf16 autocast with
``precision="bf16"``), batches of ``runtime.batch_size`` are decoded by ``runtime.workers`` processes
(`tools.evaluation.parallel`, the same batches as in one process) and moved to the device one at a time; what is
kept is the per-sample features, in float32 on the host (``[N, D]`` per modality), never the decoded inputs, so
memory is bounded by the batch plus the features. A progress bar counts samples (out of the ``index.json`` total
when the shards have one).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmssl.architectures.encoder import Encoder
from mmssl.architectures.layout import use_channels_last
from mmssl.architectures.modalities import get_modality
from mmssl.data_pipelines.batch import Batch, trim_padding
from mmssl.data_pipelines.shards import resolve_shards, shard_sizes
from mmssl.objectives.base import fused_summary, fusion_view
from mmssl.tools.evaluation.parallel import OrderedBatches
from mmssl.tools.evaluation.runtime import Progress, Runtime
from mmssl.tools.export.model import CONFIG, ITM_HEAD, WEIGHTS, LoadedModel

CACHE_DIR = "feature_cache"
FUSED = "fused"
# part of the cache key: bump when what a feature holds or how it is computed changes (2: fused summary, fusion view;
# 3: text run cut to its longest row, convolutional towers on channels-last inputs)
FEATURES_FORMAT = 3


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


Read = tuple[dict[str, Tensor], list[str], dict[str, list[Any]], dict[str, int]]  # tensors, keys, meta, errors


def read_features(urls: list[str], *, fields: dict[str, list[str]], decoders: dict[str, Any], batch_size: int,
                  where: str, encode: Callable[[Batch], dict[str, Tensor]], runtime: Runtime | None = None,
                  desc: str = "features") -> Read:
    """One pass over ``urls``: ``encode(batch)``'s named ``[b, ...]`` tensors (on any device) concatenated over the
    batches on the host (token sequences right-padded to the longest), with the samples' keys, metadata (absent
    fields None) and the data errors the stream counted. Batches are decoded by ``runtime.workers`` processes."""
    parts: dict[str, list[Tensor]] = {}
    keys: list[str] = []
    meta: dict[str, list[Any]] = {}
    errors: dict[str, int] = {}
    count = 0
    sizes = shard_sizes(list(urls))
    workers = runtime.workers if runtime is not None else 0
    with OrderedBatches(urls, fields=fields, decoders=decoders, batch_size=batch_size, where=where,
                        workers=workers) as batches, \
            Progress(runtime, desc, sum(sizes.values()) if sizes else None) as bar:
        for batch in batches:
            for k, v in batch.stats.items():
                errors[k] = errors.get(k, 0) + v
            for name, value in encode(batch).items():
                parts.setdefault(name, []).append(value.cpu())
            n = len(batch)
            keys.extend(batch.keys)
            for k in set(meta) | set(batch.meta):
                meta.setdefault(k, [None] * count).extend(batch.meta.get(k, [None] * n))
            count += n
            bar.update(n)
    return {k: _pad_cat(v) for k, v in parts.items()}, keys, meta, errors


def cached(cache_file: Path, compute: Callable[[], Read], *, cache: bool = True) -> Read:
    """``compute()``, or what an earlier call stored in ``cache_file`` (safetensors + a JSON sidecar, written
    atomically); boolean tensors round-trip as bool."""
    if cache and cache_file.exists():
        tensors = load_file(str(cache_file))
        side = json.loads(cache_file.with_suffix(".json").read_text())
        bools = set(side.get("bool", []))
        return ({k: v.bool() if k in bools else v for k, v in tensors.items()}, side["keys"], side["meta"],
                side["data_errors"])
    tensors, keys, meta, errors = compute()
    if cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.name + ".part")
        save_file({k: (v.to(torch.uint8) if v.dtype == torch.bool else v).contiguous() for k, v in tensors.items()},
                  str(tmp))
        cache_file.with_suffix(".json").write_text(json.dumps({
            "keys": keys, "meta": meta, "data_errors": errors,
            "bool": sorted(k for k, v in tensors.items() if v.dtype == torch.bool)}))
        os.replace(tmp, cache_file)
    return tensors, keys, meta, errors


@dataclass
class Features:
    """One encoder's features over a shard set."""

    pooled: torch.Tensor  # [N, D] tower features (what a linear probe reads)
    embeddings: torch.Tensor  # [N, E] projected embeddings (what retrieval compares)
    keys: list[str]
    meta: dict[str, list[Any]]
    present: torch.Tensor  # bool [N]: the sample carried this modality and it decoded
    data_errors: dict[str, int]


def model_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (cpu for a module without any)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _runtime(runtime: Runtime | None, device: torch.device, batch_size: int | None) -> Runtime:
    """``runtime``, or a quiet one-process one on ``device``; ``batch_size`` (when given) overrides its batch size."""
    rt = runtime if runtime is not None else Runtime(device=device, progress=False)
    return rt if batch_size is None else Runtime(rt.device, batch_size, rt.workers, rt.precision, rt.progress)


@torch.no_grad()
def extract(encoder_dir: str | Path, shards: str | list[str], *, where: str = "--shards", random_init: bool = False,
            seed: int = 0, batch_size: int | None = None, field_exts: list[str] | None = None, cache: bool = True,
            runtime: Runtime | None = None) -> Features:
    """Encode every sample of ``shards`` with the exported encoder (or its random-init twin) on ``runtime``'s
    device (default: the CPU, one process)."""
    src = Path(encoder_dir)
    urls = resolve_shards(shards, where=where)
    rt = _runtime(runtime, torch.device("cpu"), batch_size)
    key = cache_key(src, ("model.safetensors", "head.safetensors", "config.json"), urls, FEATURES_FORMAT, random_init,
                    seed, rt.cache_tag())

    def compute() -> Read:
        encoder = Encoder.from_dir(src, random_init=random_init, seed=seed).to(rt.device)
        use_channels_last(encoder, None)  # convolutional towers read NHWC inputs, as in training (auto)
        m = encoder.modality

        def encode(batch: Batch) -> dict[str, Tensor]:
            n = len(batch)
            [dev] = trim_padding([batch], [m])  # text cut to its longest row, as the trainer's feed does
            dev = dev.to(rt.device)
            if m in dev.inputs:
                with rt.autocast():
                    pooled, emb = encoder(dev.inputs[m])
            else:
                pooled, emb = torch.zeros(n, encoder.tower.num_features), torch.zeros(n, encoder.embed_dim)
            return {"pooled": pooled.float(), "embeddings": emb.float(), "present": batch.present[m]}

        return read_features(urls, fields={m: field_exts or list(get_modality(m).extensions)},
                             decoders={m: encoder.decoder()}, batch_size=rt.batch_size, where=where, encode=encode,
                             runtime=rt, desc=f"{m} features {where}")

    tensors, keys, meta, errors = cached(src / CACHE_DIR / f"{key}.safetensors", compute, cache=cache)
    return Features(tensors["pooled"], tensors["embeddings"], keys, meta, tensors["present"].bool(), errors)


@torch.no_grad()
def extract_model_features(loaded: LoadedModel, shards: str | list[str], *, where: str = "--shards",
                           modalities: list[str] | None = None, random_init: bool = False, seed: int = 0,
                           corruption: Corruption | None = None, batch_size: int | None = None,
                           keep_tokens: bool = False, cache: bool = True, runtime: Runtime | None = None
                           ) -> ModelFeatures:
    """Encode every sample of ``shards`` with ``loaded`` (see the module docstring). With a ``runtime`` the model
    is moved to its device; without one it runs where it is, in one process."""
    names = list(modalities or loaded.modalities)
    for m in names:
        loaded.check_modality(m, where)
    if corruption is not None:
        loaded.check_modality(corruption.modality, "--corrupt")
    urls = resolve_shards(shards, where=where)
    rt = _runtime(runtime, model_device(loaded.model), batch_size)
    key = cache_key(loaded.source, (WEIGHTS, ITM_HEAD, CONFIG), urls, FEATURES_FORMAT, random_init, seed, names,
                    keep_tokens, corruption.tag() if corruption else "clean", rt.cache_tag())
    decoders = loaded.decoders(names)
    if corruption is not None and corruption.kind != "removed":
        plugin = get_modality(corruption.modality)
        decoders[corruption.modality] = plugin.corrupted_decoder(loaded.config.towers[corruption.modality],
                                                                 corruption.kind, corruption.level)
    query = fusion_query(loaded)

    def encode(batch: Batch) -> dict[str, Tensor]:
        n = len(batch)
        # text cut to its longest row as the trainer's feed does; not with keep_tokens (token states of every
        # batch are concatenated at the loaded length)
        dev = (batch if keep_tokens else trim_padding([batch], names)[0]).to(rt.device)
        present = {m: dev.present[m].clone() for m in names}
        if corruption is not None and corruption.kind == "removed":
            present[corruption.modality][:] = False
        inputs = {m: dev.inputs[m] for m in names if m in dev.inputs}
        with rt.autocast():
            out = loaded.model(inputs, {m: present[m] for m in inputs})
        parts: dict[str, Tensor] = {}
        for m in names:
            if m in out.embeddings:
                pooled = out.pooled[m].float() * present[m][:, None]
                emb = out.embeddings[m].float() * present[m][:, None]
            else:
                pooled = torch.zeros(n, loaded.model.spec.feature_dims[m])
                emb = torch.zeros(n, loaded.model.spec.embed_dim)
            parts.update({f"pooled.{m}": pooled, f"embeddings.{m}": emb, f"present.{m}": present[m]})
            if keep_tokens and m in out.tokens:  # as `fuse` takes them, for ITM re-ranking
                states, mask = fusion_view(out, m)
                parts.update({f"tokens.{m}": states.float(), f"token_mask.{m}": mask})
        fused, fused_present = _fused(loaded.model, out, query, names, present, n)
        if fused is not None:
            parts.update({FUSED: fused, "fused_present": fused_present})
        return parts

    def compute() -> Read:
        loaded.model.to(rt.device)
        use_channels_last(loaded.model, None)  # convolutional towers read NHWC inputs, as in training (auto)
        return read_features(urls, fields=loaded.fields(names), decoders=decoders, batch_size=rt.batch_size,
                             where=where, encode=encode, runtime=rt,
                             desc=f"features {where}" + (f" {corruption.tag()}" if corruption else ""))

    tensors, keys, meta, errors = cached(loaded.source / CACHE_DIR / f"{key}.safetensors", compute, cache=cache)
    return _assemble(tensors, keys, meta, errors, names)


def _fused(model: Any, out: Any, query: str | None, names: list[str], present: dict[str, Tensor], n: int
           ) -> tuple[Tensor | None, Tensor | None]:
    if len(names) < 2:
        return None, None
    all_present = torch.stack([present[m] for m in names]).all(0)
    if query is not None and query in out.fused:
        fused = out.fused[query]
        mask = out.token_mask.get(query, torch.ones(fused.shape[:2], dtype=torch.bool, device=fused.device))
        return fused_summary(model, fused, mask.bool()[:, : fused.shape[1]]).float(), all_present
    if query is None:  # fusion-free: late concatenation of the pooled features (absent modality -> zeros)
        pooled = [out.pooled[m].float() * present[m][:, None] if m in out.pooled else None for m in names]
        if any(p is None for p in pooled):
            return None, None
        return torch.cat(pooled, -1), all_present
    return None, None


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

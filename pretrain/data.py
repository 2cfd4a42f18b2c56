"""Wiring the stream to the model: which shard members feed which modality, and with which decoder."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from mmssl.architectures.modalities import get_modality
from mmssl.data_pipelines.epochs import exact_batches_per_epoch
from mmssl.data_pipelines.shards import resolve_shards, shard_sizes
from mmssl.data_pipelines.stream import ShardStream, Source, make_loader, read_once
from mmssl.objectives.base import VIEW_SEP, base_modality
from mmssl.pretrain.precision import input_dtype
from mmssl.pretrain.recipe import Recipe, RecipeError


def view_names(recipe: Recipe) -> dict[str, str]:
    """batch key -> modality: each tower's modality, plus ``m@1 .. m@{k-1}`` for ``data.views: {m: k}``."""
    names = {m: m for m in recipe.model.towers}
    for m, k in recipe.data.views.items():
        names.update({f"{m}{VIEW_SEP}{i}": m for i in range(1, k)})
    return names


def modality_fields(recipe: Recipe) -> dict[str, list[str]]:
    """batch key -> shard member extensions: ``data.fields`` where given, else the plug-in's defaults."""
    return {key: list(recipe.data.fields.get(m) or get_modality(m).extensions)
            for key, m in view_names(recipe).items()}


def train_decoders(recipe: Recipe, *, compact: bool = False) -> dict[str, object]:
    """batch key -> training decoder (augmenting); views decode the same bytes with fresh random draws.
    ``compact``: each plug-in's compact form (uint8 pixels), finished on the device by `device_transforms`."""
    plugins = {m: get_modality(m) for m in recipe.model.towers}
    decoders = {m: plugins[m].compact_decoder(cfg)[0] if compact else plugins[m].decoder(cfg, train=True)
                for m, cfg in recipe.model.towers.items()}
    return {key: decoders[m] for key, m in view_names(recipe).items()}


def device_transforms(recipe: Recipe) -> dict[str, Any]:
    """batch key -> what finishes a compact decoder's output on the device (`ModalityPlugin.compact_decoder`);
    keys whose compact form is already final are left out."""
    finish = {m: get_modality(m).compact_decoder(cfg)[1] for m, cfg in recipe.model.towers.items()}
    return {key: finish[m] for key, m in view_names(recipe).items() if finish[m] is not None}


def eval_decoders(recipe: Recipe) -> dict[str, object]:
    """tower modality -> evaluation decoder (no augmentation)."""
    return {m: get_modality(m).decoder(cfg, train=False) for m, cfg in recipe.model.towers.items()}


def data_sources(recipe: Recipe) -> list[Source]:
    """``data.sources`` (or ``data.train`` as one source) with their shards resolved; errors name the key."""
    if recipe.data.sources and recipe.data.train:
        raise RecipeError("data.train and data.sources are both set; put data.train into data.sources as one entry")
    if not recipe.data.sources:
        if not recipe.data.train:
            raise RecipeError("data.train is not set (a shard directory, index.json, brace pattern or URL)")
        urls = resolve_shards(recipe.data.train, where="data.train")
        return [Source("train", tuple(urls), sizes=shard_sizes(urls), where="data.train")]
    keys = set(view_names(recipe))
    sources, names = [], set()
    for i, cfg in enumerate(recipe.data.sources):
        where = f"data.sources.{i}"
        name = cfg.name or f"source{i}"
        if name in names:
            raise RecipeError(f"{where}.name: {name!r} is used twice")
        names.add(name)
        if not cfg.train:
            raise RecipeError(f"{where}.train is not set (a shard directory, index.json, brace pattern or URL)")
        if not cfg.weight > 0:
            raise RecipeError(f"{where}.weight must be > 0, got {cfg.weight}")
        modalities = None
        if cfg.modalities is not None:
            unknown = sorted(set(cfg.modalities) - set(recipe.model.towers))
            if unknown or not cfg.modalities:
                raise RecipeError(f"{where}.modalities: {unknown[0] if unknown else '[]'!r} is not a tower of the "
                                  f"model (towers: {sorted(recipe.model.towers)})")
            modalities = tuple(k for k in keys if base_modality(k) in cfg.modalities)
        urls = resolve_shards(cfg.train, where=f"{where}.train")
        sources.append(Source(name, tuple(urls), cfg.weight, modalities, shard_sizes(urls), f"{where}.train"))
    return sources


def batches_per_epoch(recipe: Recipe, world_size: int) -> int | None:
    """Batches per rank in one exact epoch (``data.sampling: exact``), ``V·⌈max_g n_g / B⌉``; None otherwise."""
    if recipe.data.sampling != "exact":
        return None
    (source,) = data_sources(recipe)
    sizes = source.sizes or {}
    readers = world_size * recipe.data.streams_per_rank
    return recipe.data.streams_per_rank * exact_batches_per_epoch(sum(sizes[u] for u in source.urls), readers,
                                                                  recipe.data.batch_size)


def train_urls(recipe: Recipe) -> list[str]:
    return [u for s in data_sources(recipe) for u in s.urls]


def build_stream(recipe: Recipe, *, rank: int, world_size: int, start_batch: int,
                 positions: Mapping[int, Mapping[str, Any]] | None = None, compact: bool = False) -> ShardStream:
    """The training stream of this rank; ``compact``: decoded in the compact form (`train_decoders`)."""
    decoders = train_decoders(recipe, compact=compact)
    return ShardStream(
        sources=data_sources(recipe),
        sampling=recipe.data.sampling,
        positions=positions,
        fields=modality_fields(recipe),
        decoders=decoders,
        batch_size=recipe.data.batch_size,
        rank=rank,
        world_size=world_size,
        seed=recipe.data.seed,
        shuffle_buffer=recipe.data.shuffle_buffer,
        retries=recipe.data.retries,
        retry_backoff_s=recipe.data.retry_backoff_s,
        streams_per_rank=recipe.data.streams_per_rank,
        start_batch=start_batch,
        where="data.train",
    )


def build_loader(recipe: Recipe, *, rank: int, world_size: int, start_batch: int, pin_memory: bool = False,
                 positions: Mapping[int, Mapping[str, Any]] | None = None, compact: bool = False):
    stream = build_stream(recipe, rank=rank, world_size=world_size, start_batch=start_batch, positions=positions,
                          compact=compact)
    return make_loader(stream, num_workers=recipe.data.num_workers, prefetch_factor=recipe.data.prefetch_factor,
                       pin_memory=pin_memory)


def feature_source(recipe: Recipe, model: torch.nn.Module, *, rank: int, world_size: int,
                   device: torch.device) -> Any:
    """A `FeatureSource` for pseudo-label services: this rank's shards of ``data.train`` (every ``world_size``-th
    shard from ``rank``) read once in order, decoded without augmentation, encoded by ``model`` in eval mode
    without gradient. Lazy: the consumer decides how many samples it clusters."""
    urls = train_urls(recipe)[rank::world_size]
    decoders = eval_decoders(recipe)
    fields = {m: exts for m, exts in modality_fields(recipe).items() if m in recipe.model.towers}
    dtype = input_dtype(recipe.train.precision)

    def features() -> Iterator[tuple[list[str], Any]]:
        was_training = model.training
        model.eval()
        try:
            for batch in read_once(urls, fields=fields, decoders=decoders, batch_size=recipe.data.batch_size,
                                   where="data.train"):
                batch = batch.to(device, float_dtype=dtype)
                with torch.no_grad():
                    yield batch.keys, model(batch.inputs, batch.present)
        finally:
            model.train(was_training)

    return features

"""Wiring the stream to the model: which shard members feed which modality, and with which decoder."""

from __future__ import annotations

from architectures.modalities import get_modality
from data_pipelines.shards import resolve_shards
from data_pipelines.stream import ShardStream, make_loader
from pretrain.recipe import Recipe


def view_names(recipe: Recipe) -> dict[str, str]:
    """batch key -> modality: each tower's modality, plus ``m@1 .. m@{k-1}`` for ``data.views: {m: k}``."""
    names = {m: m for m in recipe.model.towers}
    for m, k in recipe.data.views.items():
        names.update({f"{m}@{i}": m for i in range(1, k)})
    return names


def modality_fields(recipe: Recipe) -> dict[str, list[str]]:
    """batch key -> shard member extensions: ``data.fields`` where given, else the plug-in's defaults."""
    return {key: list(recipe.data.fields.get(m) or get_modality(m).extensions)
            for key, m in view_names(recipe).items()}


def train_decoders(recipe: Recipe) -> dict[str, object]:
    """batch key -> training decoder (augmenting); views decode the same bytes with fresh random draws."""
    decoders = {m: get_modality(m).decoder(cfg, train=True) for m, cfg in recipe.model.towers.items()}
    return {key: decoders[m] for key, m in view_names(recipe).items()}


def build_stream(recipe: Recipe, *, rank: int, world_size: int, start_batch: int) -> ShardStream:
    urls = resolve_shards(recipe.data.train, where="data.train")
    decoders = train_decoders(recipe)
    return ShardStream(
        urls,
        fields=modality_fields(recipe),
        decoders=decoders,
        batch_size=recipe.data.batch_size,
        rank=rank,
        world_size=world_size,
        seed=recipe.data.seed,
        shuffle_buffer=recipe.data.shuffle_buffer,
        streams_per_rank=recipe.data.streams_per_rank,
        start_batch=start_batch,
        where="data.train",
    )


def build_loader(recipe: Recipe, *, rank: int, world_size: int, start_batch: int, pin_memory: bool = False):
    stream = build_stream(recipe, rank=rank, world_size=world_size, start_batch=start_batch)
    return make_loader(stream, num_workers=recipe.data.num_workers, prefetch_factor=recipe.data.prefetch_factor,
                       pin_memory=pin_memory)

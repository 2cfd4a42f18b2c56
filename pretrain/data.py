"""Wiring the stream to the model: which shard members feed which modality, and with which decoder."""

from __future__ import annotations

from architectures.modalities import get_modality
from data_pipelines.shards import resolve_shards
from data_pipelines.stream import ShardStream, make_loader
from pretrain.recipe import Recipe


def modality_fields(recipe: Recipe) -> dict[str, list[str]]:
    """modality -> shard member extensions: ``data.fields`` where given, else the plug-in's defaults."""
    return {m: list(recipe.data.fields.get(m) or get_modality(m).extensions) for m in recipe.model.towers}


def build_stream(recipe: Recipe, *, rank: int, world_size: int, start_batch: int) -> ShardStream:
    urls = resolve_shards(recipe.data.train, where="data.train")
    decoders = {m: get_modality(m).decoder(cfg, train=True) for m, cfg in recipe.model.towers.items()}
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

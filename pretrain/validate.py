"""Pre-launch checks: everything that can be known wrong about a recipe is reported before any rank starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from mmssl.architectures.config import build_model
from mmssl.architectures.fusion_ops import SINGLE_TOKEN_FUSIONS
from mmssl.architectures.modalities import get_modality
from mmssl.architectures.modalities.base import missing_path_message
from mmssl.data_pipelines.epochs import SAMPLINGS
from mmssl.data_pipelines.shards import resolve_shards
from mmssl.objectives.base import VIEW_SEP, base_modality
from mmssl.objectives.registry import build_objectives, kind_of
from mmssl.pretrain.data import build_stream, view_names
from mmssl.pretrain.engine import check_deepspeed_passthrough, check_train_config
from mmssl.pretrain.recipe import Recipe, RecipeError
from mmssl.pretrain.runlog import check_reporting


def validate_recipe(recipe: Recipe, *, world_size: int) -> None:
    """Raise a one-line error (RecipeError, DataError, ArchitectureError or ObjectiveError) naming the bad key."""
    check_train_config(recipe.train)
    check_reporting(recipe.train)
    check_deepspeed_passthrough(recipe.train, recipe.data.batch_size, world_size)
    recipe.model.validate()
    for name, cfg in recipe.model.towers.items():
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.metadata.get("path") and value and not Path(value).exists():
                raise RecipeError(f"model.{name}.{f.name}: {missing_path_message(f, value)}")
        get_modality(name).decoder(cfg, train=True)  # loads tokenizers and checks preprocessing settings
    with torch.device("meta"):
        model = build_model(recipe.model)
        objectives, _ = build_objectives(recipe.objectives, model.spec)  # checks each objective against the model
    fusion = recipe.model.fusion
    if recipe.model.family == "late_fusion" and fusion.kind in SINGLE_TOKEN_FUSIONS:
        for name in objectives:
            if kind_of(name) == "masked_cross":
                raise RecipeError(f"objectives.{name} predicts masked tokens from per-token fused states, but "
                                  f"model.fusion.kind={fusion.kind!r} fuses into one vector; use cross_attention "
                                  f"or mult")
    if not getattr(model, "tokens_align_with_inputs", True):
        for name in objectives:
            if kind_of(name) in ("mlm", "masked_cross"):
                raise RecipeError(f"objectives.{name} predicts masked input tokens, but with "
                                  f"model.unified.latents={recipe.model.unified.latents} the model's token states "
                                  f"are Perceiver latents; set model.unified.latents: 0")
    dropped = getattr(model, "drop_token_rates", {})
    for name, objective in objectives.items():
        for m in objective.requires.needs_masked_view:
            if base_modality(m) in dropped:
                raise RecipeError(f"objectives.{name} predicts masked {m!r} tokens, but model.unified.drop_tokens."
                                  f"{base_modality(m)}={dropped[base_modality(m)]} drops them in training, so its "
                                  f"token states no longer align with the input; remove it from drop_tokens")
    views = set(view_names(recipe)) - set(recipe.model.towers)
    for name, objective in objectives.items():
        for needed in objective.requires.modalities:
            if base_modality(needed) != needed and needed not in views:
                base, index = needed.split(VIEW_SEP, 1)
                raise RecipeError(f"objectives.{name} needs the augmented view {needed!r}: set data.views.{base}: "
                                  f"{int(index) + 1} (data.views is {dict(recipe.data.views)})")
        if recipe.train.zero_stage > objective.max_zero_stage:
            raise RecipeError(f"objectives.{name} needs train.zero_stage <= {objective.max_zero_stage} (it keeps "
                              f"its own copy of model weights), got {recipe.train.zero_stage}")
    for modality in recipe.data.fields:
        if modality not in recipe.model.towers:
            raise RecipeError(f"data.fields.{modality}: the model has no {modality!r} tower "
                              f"(towers: {sorted(recipe.model.towers)})")
    for modality, count in recipe.data.views.items():
        if modality not in recipe.model.towers:
            raise RecipeError(f"data.views.{modality}: the model has no {modality!r} tower "
                              f"(towers: {sorted(recipe.model.towers)})")
        if count < 1:
            raise RecipeError(f"data.views.{modality} must be >= 1, got {count}")
    data = recipe.data
    if data.batch_size < 1 or data.streams_per_rank < 1 or data.num_workers < 0:
        raise RecipeError("data.batch_size and data.streams_per_rank must be >= 1, data.num_workers >= 0")
    if data.num_workers and data.streams_per_rank % data.num_workers:
        raise RecipeError(f"data.num_workers={data.num_workers} must divide data.streams_per_rank="
                          f"{data.streams_per_rank}")
    if data.sampling not in SAMPLINGS:
        raise RecipeError(f"data.sampling must be one of {', '.join(SAMPLINGS)}, got {data.sampling!r}")
    # the stream's own checks: enough shards for every reader, sizes for exact epochs, sources' modalities
    build_stream(recipe, rank=0, world_size=world_size, start_batch=0)
    if data.eval:
        resolve_shards(data.eval, where="data.eval")

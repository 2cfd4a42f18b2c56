"""``mmssl export RUN_DIR --out DIR``: the encoders of any checkpoint of a run, of any architecture family.

The fp32 weights are consolidated from the DeepSpeed checkpoint: ZeRO stages 1-3 with DeepSpeed's own
``zero_to_fp32`` reader (it handles the partitions and the fp32 master weights kept for bf16 training); stage 0
from the module weights, or, in bf16, from the fp32 master weights matched to names by the checkpoint's
``mmssl_master_params`` (`pretrain.checkpoint.master_param_names`); the names of a checkpoint written before the
attention layers were unified are converted (`architectures.layers.legacy`). Parameters that were frozen
and not saved fall back to the weights the recipe loaded them from (their sha256 checked against the run's
``frozen.json``). Written:

* ``DIR/model/``: the whole model (`tools.export.model`): the unified encoder, the late-fusion towers + fusion
  (+ ITM head), or a stitched model's bridge and heads with references to its frozen towers. Every family.
* ``DIR/<modality>/``: one encoder per tower (tower + projection head + tokenizer) where the family has separate
  towers (fusion_free, late_fusion), written by `architectures.encoder.save_encoder` in the tower library's own
  format, so ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": ...})`` or
  ``transformers.AutoModel.from_pretrained(dir)`` loads it directly.
* ``DIR/export.json``: the run, the checkpoint, the family, both kinds of directories and the learned logit scale.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmssl.architectures.config import build_model
from mmssl.architectures.encoder import save_encoder
from mmssl.architectures.layers.legacy import PARAM_LAYOUT, upgrade_state_dict
from mmssl.objectives.registry import kind_of
from mmssl.pretrain import checkpoint
from mmssl.pretrain.frozen import check_reference, frozen_reference
from mmssl.pretrain.precision import compute_dtype
from mmssl.pretrain.recipe import Recipe, RecipeError, load_recipe
from mmssl.pretrain.rundir import RECIPE
from mmssl.tools.errors import ToolError
from mmssl.tools.export.model import check_state, save_model

EXPORT_INDEX = "export.json"
MODEL_DIR = "model"
PER_TOWER = ("fusion_free", "late_fusion")  # families made of one tower + head per modality


def consolidated_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the trained task (``model.*``, ``objectives.*``)."""
    import logging

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model_file = root / tag / "mp_rank_00_model_states.pt"
    if model_file.is_file() and not any((root / tag).glob("*optim_states.pt")):  # ZeRO-0 writes no partitions
        return _stage0_state_dict(torch.load(model_file, map_location="cpu", weights_only=True), model_file)
    bf16_partitions = sorted((root / tag).glob(f"{BF16_PARTITION_PREFIX}*_optim_states.pt"))
    if model_file.is_file() and bf16_partitions and _is_bf16_optimizer(bf16_partitions[0]):
        return _bf16_optimizer_state_dict(model_file, bf16_partitions)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)


def _stage0_state_dict(states: dict[str, Any], source: Path) -> dict[str, torch.Tensor]:
    """Stage 0: the module's weights, replaced by the fp32 master weights where the optimizer kept them."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    masters = (states.get("optimizer") or {}).get("fp32_groups")
    if masters is None:  # fp32 training: the module weights are the master weights
        return state
    names = states.get(checkpoint.MASTER_PARAM_NAMES)
    if names is None:
        raise checkpoint.CheckpointError(
            f"{source} holds bf16/fp16 ZeRO-0 weights whose fp32 master copies carry no parameter names "
            f"({checkpoint.MASTER_PARAM_NAMES} missing: not written by this mmssl); export would lose precision")
    for group_names, group in zip(names, masters, strict=True):
        for name, master in zip(group_names, group, strict=True):
            if tuple(master.shape) != tuple(state[name].shape):
                raise checkpoint.CheckpointError(f"{source}: master weight of {name!r} is {list(master.shape)}, "
                                                 f"the module's {list(state[name].shape)}")
            state[name] = master.float()
    return state


BF16_PARTITION_PREFIX = "bf16_zero_pp_rank_"


def _is_bf16_optimizer(partition: Path) -> bool:
    """A partition of DeepSpeed's ``BF16_Optimizer`` (ZeRO-1 with fp32 accumulation), not of its ZeRO optimizer:
    both name their files ``bf16_zero_pp_rank_*``; only the ZeRO optimizer records its ``zero_stage``."""
    with torch.serialization.safe_globals(checkpoint.deepspeed_globals()):
        state = torch.load(partition, map_location="cpu", weights_only=True)["optimizer_state_dict"]
    return "zero_stage" not in state and "param_slice_mappings" in state


def _bf16_optimizer_state_dict(model_file: Path, partitions: list[Path]) -> dict[str, torch.Tensor]:
    """ZeRO-1 in bf16 with fp32 gradient accumulation (DeepSpeed's ``BF16_Optimizer``, which ``zero_to_fp32`` does
    not read): each rank's file holds its slice of every flat fp32 master group and, per parameter, the
    ``(start, numel)`` of its fragment in that slice (``param_slice_mappings``); a parameter is its fragments
    concatenated in rank order, shaped as the model-states file records."""
    with torch.serialization.safe_globals(checkpoint.deepspeed_globals()):
        states = torch.load(model_file, map_location="cpu", weights_only=True)
        ranks = [torch.load(p, map_location="cpu", weights_only=True)["optimizer_state_dict"] for p in
                 sorted(partitions, key=lambda p: int(p.name[len(BF16_PARTITION_PREFIX):].split("_", 1)[0]))]
    state = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    shapes = {name: shape for group in states["param_shapes"] for name, shape in group.items()}
    pieces: dict[str, list[torch.Tensor]] = {}
    for rank in ranks:
        for flat, mapping in zip(rank["single_partition_of_fp32_groups"], rank["param_slice_mappings"], strict=True):
            for name, where in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, where.start, where.numel))
    for name, parts in pieces.items():
        full = torch.cat(parts)
        if full.numel() != math.prod(shapes[name]):
            raise checkpoint.CheckpointError(f"{model_file.parent}: the fp32 fragments of {name!r} hold {full.numel()} "
                                             f"values, its shape {list(shapes[name])} needs {math.prod(shapes[name])}")
        state[name] = full.view(shapes[name]).clone()
    return state


@dataclass
class TrainedRun:
    """A run's checkpoint, consolidated and loaded: the recipe, the model with its trained weights (frozen parts
    as the recipe loads them), the full fp32 state (``model.*``, ``objectives.*``) and the checkpoint read."""

    run: Path
    recipe: Recipe
    model: torch.nn.Module
    state: dict[str, torch.Tensor]
    checkpoint: Path


def run_recipe(run_dir: str | Path) -> Recipe:
    """The recipe a run directory was trained with."""
    recipe_file = Path(run_dir) / RECIPE
    if not recipe_file.is_file():
        raise RecipeError(f"{run_dir} is not a run directory ({RECIPE} missing)")
    return load_recipe(recipe_file)


def load_trained(run_dir: str | Path, *, checkpoint_tag: str | None = None) -> TrainedRun:
    """Consolidate checkpoint ``checkpoint_tag`` (default: the latest) of a run and load it into its model."""
    run = Path(run_dir)
    recipe = run_recipe(run)
    found = checkpoint.find(run, checkpoint_tag or "latest")
    if found is None:
        raise checkpoint.CheckpointError(f"{run} has no checkpoint to export yet")
    root, tag = found
    state = consolidated_state_dict(root, tag)
    model = build_model(recipe.model, seed=recipe.train.seed)
    # frozen weights rebuilt now = those trained with (digested in the run's compute dtype)
    check_reference(root / tag, frozen_reference(model, dtype=compute_dtype(recipe.train.precision)))
    own = model.state_dict()
    prefix = "model."
    trained = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if checkpoint.param_layout(root / tag) < PARAM_LAYOUT:  # written before the attention layers were unified
        trained = upgrade_state_dict(trained)
    frozen = [k for k in own if _is_frozen(model, k)]
    try:
        check_state(own, trained, f"checkpoint {root / tag}", allowed_missing=frozen)
    except ToolError as exc:
        raise checkpoint.CheckpointError(f"{exc} (the recipe in {run / RECIPE} builds a "
                                         f"{recipe.model.family} model)") from None
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in trained.items()}})
    return TrainedRun(run, recipe, model, state, root / tag)


def export_run(run_dir: str | Path, out_dir: str | Path, *, checkpoint_tag: str | None = None) -> dict[str, Any]:
    trained = load_trained(run_dir, checkpoint_tag=checkpoint_tag)
    run, recipe, model, state = trained.run, trained.recipe, trained.model, trained.state
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoders = {}
    if recipe.model.family in PER_TOWER:
        for name, tower_cfg in recipe.model.towers.items():
            path = save_encoder(out / name, name, tower_cfg, model.towers[name], model.heads[name],
                                recipe.model.embed_dim)
            encoders[name] = str(path)
    model_dir = save_model(out / MODEL_DIR, recipe.model, model, itm=_matching_head(recipe, state))
    scales = {k: float(v.detach().exp().clamp(max=1e4).reshape(-1)[0]) for k, v in state.items()
              if k.endswith("log_logit_scale")}
    index = {
        "run": str(run.resolve()),
        "recipe": recipe.name,
        "family": recipe.model.family,
        "checkpoint": str(trained.checkpoint),
        "model": str(model_dir),
        "encoders": encoders,
        "embed_dim": recipe.model.embed_dim,
        "logit_scales": scales,
    }
    (out / EXPORT_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def _matching_head(recipe: Recipe, state: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The first matching objective's ITM head (``objectives.<name>.head.*``) and its query/context."""
    for name, term in recipe.objectives.terms.items():
        head = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.startswith(f"objectives.{name}.head.")}
        if kind_of(name) == "matching" and head:
            return {"objective": name, "query": term.query, "context": term.context}, head
    return None


def _is_frozen(model: torch.nn.Module, key: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight under each of its names
    return key in params and not params[key].requires_grad

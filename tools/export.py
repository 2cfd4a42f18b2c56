"""``mmssl export RUN_DIR --out DIR``: one directory per encoder from any checkpoint of a run.

The fp32 weights are consolidated from the DeepSpeed checkpoint with DeepSpeed's own ``zero_to_fp32`` reader
(it handles ZeRO stages 0-3 and the fp32 master weights kept for bf16 training); parameters that were frozen
and not saved fall back to the weights the recipe loaded them from. Each encoder is then written by
`architectures.encoder.save_encoder` (``model.safetensors`` + ``config.json`` + ``head.safetensors`` +
tokenizer), and ``DIR/export.json`` records the run, the checkpoint and the learned logit scale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from architectures.config import build_model
from architectures.encoder import save_encoder
from pretrain import checkpoint
from pretrain.frozen import check_reference, frozen_reference
from pretrain.launch import RECIPE_FILE
from pretrain.recipe import RecipeError, load_recipe

EXPORT_INDEX = "export.json"
EXPORTABLE = ("fusion_free", "late_fusion")  # families made of one tower + head per modality


def consolidated_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the trained task (``model.*``, ``objectives.*``)."""
    import logging

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)


def export_run(run_dir: str | Path, out_dir: str | Path, *, checkpoint_tag: str | None = None) -> dict[str, Any]:
    run = Path(run_dir)
    recipe_file = run / RECIPE_FILE
    if not recipe_file.is_file():
        raise RecipeError(f"{run} is not a run directory ({RECIPE_FILE} missing)")
    recipe = load_recipe(recipe_file)
    found = checkpoint.find(run, checkpoint_tag or "latest")
    if found is None:
        raise checkpoint.CheckpointError(f"{run} has no checkpoint to export yet")
    root, tag = found
    state = consolidated_state_dict(root, tag)
    if recipe.model.family not in EXPORTABLE:
        raise RecipeError(f"mmssl export writes per-tower encoders, which model.family={recipe.model.family!r} "
                          f"does not have (exportable families: {list(EXPORTABLE)})")
    model = build_model(recipe.model, seed=recipe.train.seed)
    check_reference(root / tag, frozen_reference(model))  # frozen weights rebuilt now = those trained with
    own = model.state_dict()
    prefix = "model."
    trained = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    unknown = sorted(set(trained) - set(own))
    if unknown:
        raise checkpoint.CheckpointError(f"{root / tag} holds {unknown[0]!r}, which the recipe's model lacks")
    missing = sorted(k for k in set(own) - set(trained) if not _is_frozen(model, k))
    if missing:
        raise checkpoint.CheckpointError(f"{root / tag} lacks trained weights for {missing[0]!r}")
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in trained.items()}})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoders = {}
    for name, tower_cfg in recipe.model.towers.items():
        path = save_encoder(out / name, name, tower_cfg, model.towers[name], model.heads[name], recipe.model.embed_dim)
        encoders[name] = str(path)
    scales = {k: float(v.detach().exp().clamp(max=1e4).reshape(-1)[0]) for k, v in state.items()
              if k.endswith("log_logit_scale")}
    index = {
        "run": str(run.resolve()),
        "recipe": recipe.name,
        "checkpoint": str(root / tag),
        "encoders": encoders,
        "embed_dim": recipe.model.embed_dim,
        "logit_scales": scales,
    }
    (out / EXPORT_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def _is_frozen(model: torch.nn.Module, key: str) -> bool:
    params = dict(model.named_parameters())
    return key in params and not params[key].requires_grad

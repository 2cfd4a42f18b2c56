"""DeepSpeed ZeRO-3 trains every family as ZeRO-0 does. Property: on the same global batches (2 gloo ranks, fp32,
3 steps), the consolidated weights of a ZeRO-3 run equal those of a ZeRO-0 run — model and objectives alike.

What this guards: ZeRO-3 re-gathers a module's partitioned parameters before its backward only through hooks on
the tensors it can find in the module's output (tuples, lists, dicts). Model and loss records are therefore named
tuples (`ModelOutput`, `LossOutput`), and the unified model's own [CLS] / type-embedding vectors are used through
module calls. Before, a learned temperature (the contrastive objective's ``log_logit_scale``) silently got a zero
gradient in the first step, and the unified family's first backward failed (a gathered parameter of size 0)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mmssl.architectures.config import build_model
from mmssl.objectives.registry import build_objectives
from mmssl.pretrain.recipe import load_recipe
from mmssl.tools.export.run import consolidated_state_dict
from tests.conftest import run_ranks, tiny_recipe_dict, write_recipe

pytestmark = pytest.mark.distributed

CONTRASTIVE = {"contrastive": {"pairs": [["audio", "text"]]}}
MATCHING = {"query": "text", "context": "audio", "negatives": "random", "exclude_duplicates": "text"}
CONFIGS: dict[str, dict[str, Any]] = {
    "fusion_free_contrastive": {"model": {}, "objectives": CONTRASTIVE,
                                "moved": ["objectives.contrastive.log_logit_scale"]},
    "late_fusion_mult_siglip_matching": {
        "model": {"family": "late_fusion", "fusion": {"kind": "mult", "query": "text", "width": 48, "depth": 1,
                                                      "heads": 2, "options": {"self_depth": 1}}},
        "objectives": {"siglip": {"pairs": [["audio", "text"]]}, "matching": MATCHING},
        "moved": ["objectives.siglip.logit_bias", "model.fusion.positions.text"],
    },
    "unified_experts_fusion": {
        "model": {"family": "unified", "unified": {"width": 48, "depth": 2, "heads": 2, "experts": True,
                                                   "fusion_depth": 1, "query": "text"}},
        "objectives": {**CONTRASTIVE, "matching": MATCHING, "mlm": {"modality": "text"}},
        "moved": ["model.cls_tokens.text", "model.type_embeds.audio"],
    },
}


@pytest.fixture(scope="module")
def trained(asterisk_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    """Every config at ZeRO-0 and ZeRO-3, 3 steps on the same fixed global batches, all on the same 2 ranks one
    after another: (config, stage) -> run directory."""
    tmp = tmp_path_factory.mktemp("zero3_equivalence")
    runs, args = {}, []
    for name, config in sorted(CONFIGS.items()):
        for stage in (0, 3):
            recipe = tiny_recipe_dict(asterisk_data, train={"steps": 3, "warmup_steps": 1, "zero_stage": stage,
                                                            "ckpt_every": 3})
            recipe["model"].update(config["model"])
            recipe["objectives"] = config["objectives"]
            path = write_recipe(tmp / f"{name}-zero{stage}.yaml", recipe)
            runs[name, stage] = tmp / f"{name}-zero{stage}"
            args += [str(path), str(runs[name, stage]), "16", str(tmp / f"{name}-f{stage}.st")]
    proc = run_ranks(2, ["tests/helpers/fixed_batches.py", *args], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return runs


def _weights(run: Path) -> dict[str, torch.Tensor]:
    root = run / "checkpoints"
    return {k: v.detach() for k, v in consolidated_state_dict(root, (root / "latest").read_text().strip()).items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_zero3_weights_equal_zero0_weights(name: str, trained: dict[tuple[str, int], Path]) -> None:
    config = CONFIGS[name]
    zero0, zero3 = (_weights(trained[name, stage]) for stage in (0, 3))
    assert zero0.keys() == zero3.keys()
    worst, where = max((float((zero0[k] - zero3[k]).abs().max()), k) for k in zero0)
    assert worst <= 1e-6, f"{name}: ZeRO-0 and ZeRO-3 weights differ by {worst} at {where}"
    recipe = load_recipe(trained[name, 0] / "recipe.yaml")
    model = build_model(recipe.model, seed=recipe.train.seed)
    objectives, _ = build_objectives(recipe.objectives, model.spec)
    initial = {**{f"model.{k}": v for k, v in model.state_dict().items()},
               **{f"objectives.{n}.{k}": v for n, o in objectives.items() for k, v in o.state_dict().items()}}
    for key in config["moved"]:  # parameters ZeRO-3 used to lose: training really moved them
        assert float((zero3[key] - initial[key]).abs().max()) > 1e-5, key

"""The bundled tiny recipes pointed at the test session's real data (`tests.conftest`: ``fashion``,
``ktuberling_data``, ``frozen_parts``): the overrides a test passes to train ``<method>-tiny`` on 2 CPU ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmssl.pretrain.recipe import load_recipe

METHODS = ("clip", "siglip", "slip", "albef", "flava", "factorcl", "vatt", "xdc", "cav-mae", "blip2", "limber",
           "flamingo")
STITCHED = ("blip2", "limber", "flamingo")
KTUBERLING = ("vatt", "xdc", "cav-mae")
FAMILIES = {"fusion_free": "clip", "late_fusion": "flava", "unified": "vatt", "stitched": "blip2"}  # one tiny each


def data_overrides(method: str, train: Path) -> list[str]:
    if method != "flava":
        return [f"data.train={train}"]
    recipe = load_recipe(f"{method}-tiny")
    sources = [{"name": s.name, "train": str(train), "weight": s.weight, "modalities": s.modalities}
               for s in recipe.data.sources]
    return [f"data.sources={json.dumps(sources)}"]


def tiny_overrides(method: str, request: pytest.FixtureRequest, *, steps: int = 3) -> list[str]:
    """``<method>-tiny`` on the session's data for ``steps`` steps, logging every step, no checkpoints; skips the
    test when the method's data is not installed."""
    train, spm = request.getfixturevalue("ktuberling_data" if method in KTUBERLING else "fashion")
    name = f"{method}-tiny"
    text = [f"model.text.tokenizer={spm}"] if "text" in load_recipe(name).model.towers else []
    overrides = [*data_overrides(method, train), *text, f"train.steps={steps}", "train.log_every=1",
                 "train.ckpt_every=0", "train.tensorboard=false"]
    if method in STITCHED:
        overrides += request.getfixturevalue("frozen_parts")
    return overrides

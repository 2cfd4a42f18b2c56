"""``mmssl export RUN --format open_clip --out DIR``: an image-text run as an open_clip model directory.

``open_clip.create_model_and_transforms("local-dir:DIR")`` and ``open_clip.get_tokenizer("local-dir:DIR")`` load it
offline (open_clip 3's ``local-dir:`` schema), so CLIP_benchmark and any open_clip code evaluate it. Written::

    open_clip_config.json        {"model_cfg": {embed_dim, quick_gelu, vision_cfg, text_cfg, [init_logit_bias]},
                                  "preprocess_cfg": {size, mode, mean, std, interpolation, resize_mode},
                                  "mmssl": {run, checkpoint, check: the deviations measured at export}}
    open_clip_model.safetensors  open_clip's ``CLIP`` state dict (the weights file its local-dir loader prefers)
    tokenizer.json, tokenizer_config.json   mmssl's tokenizer (`tools.export.hf_tokenizer`), which open_clip's
                                  ``HFTokenizer`` reads from DIR when ``text_cfg.hf_tokenizer_name`` is set

What open_clip can express, and so what is exported (anything else is refused, naming why): a ``fusion_free``
model with exactly an ``image`` and a ``text`` tower and linear heads, trained with an image-text ``contrastive``
(or ``siglip``) objective, whose

* image tower is a plain timm ``VisionTransformer`` (class token, no register tokens, ``token`` or ``avg`` pooling,
  LayerNorm, GELU or QuickGELU, optional LayerScale, square patches, 1 or 3 channels): it becomes open_clip's own
  ``VisionTransformer`` (open_clip's ``TimmModel`` builds timm models from a name alone, so it cannot rebuild a ViT
  of mmssl's sizes). timm ``qkv`` = ``in_proj``, a patch-embedding bias is folded into the patch positions
  (``conv(x) + b + pos = conv(x) + (pos + b)``), and a grey-scale ViT's patch kernel is spread over open_clip's three
  channels (``W/3`` each: open_clip converts grey images to RGB, three equal channels);
* text tower is CLIP's causal text transformer (``model.text.arch: clip``, pooled at the end-of-text token): open_clip's
  ``TextTransformer`` with ``pool_type='eos'`` and the tokenizer's eos / pad ids; transformers' q/k/v = ``in_proj``.

The projection heads become ``visual.proj`` / ``text_projection`` (``W^T``), the objective's clamped learned scale
``logit_scale`` (``log s``; SigLIP's bias ``logit_bias``). ``preprocess_cfg`` is mmssl's evaluation transform
(`preprocess_cfg`: size, mean/std, interpolation; the whole image resized to the square, or the centre crop).

The export checks itself: it loads DIR with open_clip and compares, on a fixed random image batch and on probe
captions, the embeddings with mmssl's (`TOLERANCE`: ``max |e_open_clip - e_mmssl| <= 1e-4 · max |e_mmssl|``, fp32)
and the token ids (equal); a mismatch is an error, so a directory that is written reproduces mmssl.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from mmssl.architectures.config import ModelConfig
from mmssl.architectures.modalities import get_modality
from mmssl.architectures.modalities.text import CLIP_ARCHS
from mmssl.architectures.towers import HFTextTower, TimmTower
from mmssl.objectives.registry import kind_of
from mmssl.pretrain.recipe import Recipe
from mmssl.tools.errors import ToolError
from mmssl.tools.export.hf_tokenizer import write_hf_tokenizer
from mmssl.tools.export.open_clip_towers import text_state, vision_state
from mmssl.tools.export.run import TrainedRun, load_trained, run_recipe

CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"
TOLERANCE = 1e-4  # max |open_clip - mmssl| over an embedding batch, relative to max |mmssl|
SCALED = ("contrastive", "siglip")  # objectives whose learned logit scale open_clip's CLIP carries
PROBE_CAPTIONS = ("a photo of a dog.", "An image of 2 Red CARS, on a black background!", "", "naïve café in Zürich",
                  "a small photo of the ankle boot " * 12)  # texts open_clip's cleaning (ftfy, whitespace) keeps


def check_model_config(model: ModelConfig, where: str) -> None:
    """Refuse a model configuration open_clip's CLIP cannot hold (family, towers, heads, text tower kind)."""
    if model.family != "fusion_free":
        raise ToolError(f"{where}: model.family={model.family!r}; an open_clip model is fusion-free (one image and "
                        "one text tower, no fusion)")
    if sorted(model.towers) != ["image", "text"]:
        raise ToolError(f"{where}: the model's towers are {sorted(model.towers)}; an open_clip model has exactly an "
                        "image and a text tower")
    if model.head != "linear":
        raise ToolError(f"{where}: model.head={model.head!r}; open_clip projects both towers linearly")
    text = model.towers["text"]
    if text.arch not in CLIP_ARCHS and not text.pretrained:
        raise ToolError(f"{where}: model.text.arch={text.arch!r} is not CLIP's causal text transformer, which is the "
                        "text tower open_clip's CLIP holds (set model.text.arch: clip)")
    if text.pool not in (None, "eot"):  # None: a causal tower's own, eot
        raise ToolError(f"{where}: model.text.pool={text.pool!r}; open_clip's text transformer pools at the "
                        "end-of-text token (pool: eot)")


def check_expressible(recipe: Recipe, where: str) -> None:
    """Refuse, before any weight is read, a recipe whose model open_clip cannot express (module docstring)."""
    check_model_config(recipe.model, where)
    if not any(kind_of(name) in SCALED and _pairs_image_text(term) for name, term in recipe.objectives.terms.items()):
        raise ToolError(f"{where}: no image-text contrastive or siglip objective (objectives: "
                        f"{sorted(recipe.objectives.terms)}), so no logit scale for open_clip's CLIP")


def _pairs_image_text(term: Any) -> bool:
    return any(sorted(pair) == ["image", "text"] for pair in getattr(term, "pairs", []) or [])


def logit_scale(trained: TrainedRun) -> dict[str, float]:
    """``{"logit_scale": log s}`` (+ ``"logit_bias"`` for SigLIP) of the first image-text contrastive/siglip term,
    ``log s`` clamped to ``[0, log max_logit_scale]`` as the objective uses it (`objectives.base.learned_scale`)."""
    for name, term in trained.recipe.objectives.terms.items():
        if kind_of(name) in SCALED and _pairs_image_text(term):
            log_s = float(trained.state[f"objectives.{name}.log_logit_scale"].detach().reshape(-1)[0])
            out = {"logit_scale": min(max(log_s, 0.0), math.log(term.max_logit_scale))}
            if kind_of(name) == "siglip":
                out["logit_bias"] = float(trained.state[f"objectives.{name}.logit_bias"].detach().reshape(-1)[0])
            return out
    raise ToolError(f"{trained.run}: no image-text contrastive or siglip objective")  # check_expressible ran first


OPEN_CLIP_INTERPOLATIONS = ("bilinear", "bicubic")


def preprocess_cfg(image_cfg: Any, where: str) -> tuple[dict[str, Any], str | None]:
    """mmssl's evaluation transform (`image_preprocessing`) in open_clip's terms, and a note where open_clip cannot
    say it exactly. The whole image resized to the square is ``resize_mode: squash``; a centre crop is ``shortest``
    (shorter side to the input size, central square), which is mmssl's at ``crop_pct`` 1 only: open_clip has no
    crop fraction. Mean/std per RGB channel (a grey-scale tower's value on all three: open_clip feeds RGB)."""
    from mmssl.architectures.modalities.image import image_preprocessing

    prep = image_preprocessing(image_cfg)
    if prep.interpolation not in OPEN_CLIP_INTERPOLATIONS:
        raise ToolError(f"{where}: model.image.interpolation={prep.interpolation!r}; open_clip's transforms "
                        f"interpolate {' or '.join(OPEN_CLIP_INTERPOLATIONS)}")
    channels = 3
    cfg = {"size": prep.image_size, "mode": "RGB", "interpolation": prep.interpolation,
           "resize_mode": "squash" if prep.crop_pct is None else "shortest",
           "mean": [float(v) for v in (list(prep.mean) * channels)[:channels]],
           "std": [float(v) for v in (list(prep.std) * channels)[:channels]]}
    note = None
    if prep.crop_pct is not None and prep.crop_pct != 1.0:
        note = (f"mmssl evaluates this tower on the central {prep.image_size} px of the image resized to "
                f"{int(prep.image_size / prep.crop_pct)} px (crop_pct {prep.crop_pct}); open_clip's transform crops "
                f"at crop_pct 1 (no crop fraction in open_clip): the same pixels give the same embeddings, the "
                "transforms frame the image differently")
    return cfg, note


def export_open_clip(run_dir: str | Path, out_dir: str | Path, *, checkpoint_tag: str | None = None
                     ) -> dict[str, Any]:
    """Write the open_clip directory of a run's checkpoint (module docstring); returns what was written and the
    deviations the self-check measured."""
    where = f"{run_dir}: cannot export to open_clip"
    try:
        import open_clip  # noqa: F401  (the export loads itself back with open_clip)
    except ImportError:
        raise ToolError("mmssl export --format open_clip needs open_clip_torch: pip install 'mmssl[bench]'") from None
    check_expressible(run_recipe(run_dir), where)
    trained = load_trained(run_dir, checkpoint_tag=checkpoint_tag)
    scale = logit_scale(trained)
    provenance = {"run": str(trained.run.resolve()), "recipe": trained.recipe.name,
                  "checkpoint": str(trained.checkpoint)}
    check, note = write_open_clip(out_dir, trained.model, trained.recipe.model, scale, provenance, where=where)
    return {"out": str(out_dir), "checkpoint": str(trained.checkpoint), "check": check, "preprocess_note": note,
            **scale}


def write_open_clip(out_dir: str | Path, model: nn.Module, model_cfg: ModelConfig, scale: dict[str, float],
                    provenance: dict[str, Any], *, where: str) -> tuple[dict[str, float], str | None]:
    """Write fusion-free ``model`` (built from ``model_cfg``) with logit ``scale`` as an open_clip directory and
    check it (`verify_export`); returns the measured deviations and the preprocessing note (`preprocess_cfg`)."""
    check_model_config(model_cfg, where)
    model.eval()
    image_tower, text_tower = model.towers["image"], model.towers["text"]
    if not isinstance(image_tower, TimmTower):
        raise ToolError(f"{where}: the image tower is a {type(image_tower).__name__}, not a timm ViT")
    if not isinstance(text_tower, HFTextTower):
        raise ToolError(f"{where}: the text tower is a {type(text_tower).__name__}, not CLIP's text transformer")
    image_cfg, text_cfg = model_cfg.towers["image"], model_cfg.towers["text"]
    tokenizer = get_modality("text").tokenizer(text_cfg)
    vision_cfg, visual, vision_act = vision_state(image_tower, model.heads["image"].proj.weight, where)
    text_open_clip, text_weights, text_act = text_state(text_tower, model.heads["text"].proj.weight, tokenizer, where)
    if vision_act != text_act:
        raise ToolError(f"{where}: the image tower uses {vision_act} and the text tower {text_act}; open_clip's "
                        "CLIP has one activation for both (quick_gelu)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text_open_clip["hf_tokenizer_name"] = str(out.resolve())  # local-dir loads read DIR itself
    open_clip_cfg: dict[str, Any] = {"embed_dim": model_cfg.embed_dim, "quick_gelu": vision_act == "quick_gelu",
                                     "vision_cfg": vision_cfg, "text_cfg": text_open_clip}
    state = {**{f"visual.{k}": v for k, v in visual.items()}, **text_weights,
             "logit_scale": torch.tensor(scale["logit_scale"])}
    if "logit_bias" in scale:
        open_clip_cfg["init_logit_bias"] = scale["logit_bias"]
        state["logit_bias"] = torch.tensor(scale["logit_bias"])
    save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(out / WEIGHTS))
    write_hf_tokenizer(tokenizer, out, str(text_cfg.tokenizer or text_cfg.pretrained))
    preprocess, note = preprocess_cfg(image_cfg, where)
    config = {"model_cfg": open_clip_cfg, "preprocess_cfg": preprocess,
              "mmssl": {**provenance, "tolerance": TOLERANCE, **({"preprocess_note": note} if note else {})}}
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    check = verify_export(out, model, preprocess["size"], image_cfg.in_chans, text_cfg)
    config["mmssl"]["check"] = check
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return check, note


def relative_deviation(ours: Tensor, theirs: Tensor) -> float:
    """``max |theirs - ours| / max |ours|``."""
    return float((theirs.float() - ours.float()).abs().max() / ours.float().abs().max().clamp_min(1e-12))


@torch.no_grad()
def verify_export(out: Path, model: nn.Module, image_size: int, in_chans: int, text_cfg: Any) -> dict[str, float]:
    """Load ``out`` with open_clip and compare its embeddings and token ids with mmssl's ``model`` (module
    docstring); the relative deviations, or a `ToolError` beyond `TOLERANCE`."""
    import open_clip

    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    theirs.eval()
    tokenize = open_clip.get_tokenizer(f"local-dir:{out}")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, in_chans, image_size, image_size, generator=generator)
    ours_image = model({"image": images}).embeddings["image"]
    theirs_image = theirs.encode_image(images.expand(-1, 3, -1, -1) if in_chans == 1 else images)
    tokenizer = get_modality("text").tokenizer(text_cfg)
    encoded = [tokenizer.encode(t.strip()) for t in PROBE_CAPTIONS]  # mmssl's text decoder strips
    ids = torch.stack([e["input_ids"] for e in encoded])
    their_ids = tokenize(list(PROBE_CAPTIONS))
    if not torch.equal(ids, their_ids):
        row = int((ids != their_ids).any(1).nonzero()[0])
        raise ToolError(f"{out}: open_clip's tokenizer gives {their_ids[row].tolist()} for "
                        f"{PROBE_CAPTIONS[row]!r}, mmssl's {ids[row].tolist()}")
    ours_text = model({"text": {"input_ids": ids, "attention_mask": torch.stack([e["attention_mask"]
                                                                                 for e in encoded])}})
    check = {"image": relative_deviation(ours_image, theirs_image),
             "text": relative_deviation(ours_text.embeddings["text"], theirs.encode_text(their_ids))}
    for modality, deviation in check.items():
        if not deviation <= TOLERANCE:
            raise ToolError(f"{out}: open_clip's {modality} embeddings differ from mmssl's by {deviation:.2e} of "
                            f"their scale (tolerance {TOLERANCE:g}): this tower is not one open_clip expresses")
    return check

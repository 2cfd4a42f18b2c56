"""A whole exported model of any family, in a directory of its own, loadable without the training code.

Layout written by `save_model` (``<export>/model/``)::

    model.safetensors     the model's weights (``model.state_dict()`` key space); for a stitched model only the
                          trainable bridge and heads: its frozen towers are referenced, not copied
    config.json           {"mmssl": {"format_version", "param_layout", "kind": "model", "family", "model": <the
                          recipe's model: section>, "frozen": {prefix: {"path", "sha256"}}, "itm": {...} | null}}
    itm_head.safetensors  the matching (ITM) head of a fusion model trained with ``objectives.matching``
    tokenizer.*           the text tokenizer, copied (paths in the config are relative to the directory)

`load_model` rebuilds the architecture from the config (`architectures.config.build_model`), re-reads the frozen
parts from their recorded files (checking their sha256) and loads the weights with a key and shape check, so a
directory of another architecture is an error naming the first mismatching tensor. A directory without
``param_layout`` (written before mmssl's attention layers were unified) has its weights' names converted
(`architectures.layers.legacy.upgrade_state_dict`). ``random_init=True`` builds
the same architecture with fresh seeded weights (frozen pretrained parts stay pretrained): the floor every
evaluation reports beside the trained numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmssl.architectures.config import ModelConfig, build_model
from mmssl.architectures.layers.legacy import PARAM_LAYOUT, upgrade_state_dict
from mmssl.architectures.modalities import get_modality
from mmssl.architectures.modalities.base import DecoderFn
from mmssl.architectures.stitching.pretrained import sha256_file
from mmssl.objectives.base import fused_summary
from mmssl.pretrain.recipe import model_config_from_dict, to_dict
from mmssl.tools.errors import ToolError

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
ITM_HEAD = "itm_head.safetensors"
CONFIG = "config.json"


def _excluded_prefixes(model: nn.Module, family: str) -> dict[str, str]:
    """Frozen parts stored by reference: a stitched model's towers (read from their files at load)."""
    if family != "stitched":
        return {}
    sources = getattr(model, "frozen_sources", dict)()
    return {prefix: str(path) for prefix, path in sources.items() if path}


def _is_under(key: str, prefixes: dict[str, str] | list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def save_model(out_dir: str | Path, model_cfg: ModelConfig, model: nn.Module, *,
               itm: tuple[dict[str, Any], dict[str, Tensor]] | None = None) -> Path:
    """Write ``model`` (built from ``model_cfg``) as described in the module docstring; ``itm`` is the matching
    head's ``(meta, state_dict)``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(model_cfg)
    excluded = _excluded_prefixes(model, cfg.family)
    for name, tower_cfg in cfg.towers.items():
        for key, value in get_modality(name).export_assets(tower_cfg, out).items():
            setattr(tower_cfg, key, value)
        if not excluded:  # weights travel in model.safetensors; nothing is read from the original files
            tower_cfg.pretrained = None
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not _is_under(k, excluded)}
    save_file(state, str(out / WEIGHTS))
    itm_meta = None
    if itm is not None:
        itm_meta, itm_state = itm
        save_file({k: v.detach().cpu().float().contiguous() for k, v in itm_state.items()}, str(out / ITM_HEAD))
    meta = {
        "format_version": FORMAT_VERSION,
        "param_layout": PARAM_LAYOUT,
        "kind": "model",
        "family": cfg.family,
        "model": to_dict(cfg),
        "frozen": {prefix: {"path": path, "sha256": sha256_file(path)} for prefix, path in excluded.items()},
        "itm": itm_meta,
    }
    (out / CONFIG).write_text(json.dumps({"mmssl": meta}, indent=2) + "\n")
    return out


@dataclass
class LoadedModel:
    """An exported model, rebuilt: ``model(inputs, present) -> ModelOutput`` as in training (eval mode)."""

    model: nn.Module
    config: ModelConfig
    source: Path
    itm: dict[str, Any] | None = None
    itm_head: nn.Linear | None = None

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def modalities(self) -> list[str]:
        return list(self.config.towers)

    def check_modality(self, modality: str, where: str) -> None:
        if modality not in self.config.towers:
            raise ToolError(f"{where}: the {self.family} model in {self.source} has no {modality!r} encoder "
                             f"(modalities: {self.modalities})")

    def decoders(self, modalities: list[str] | None = None) -> dict[str, DecoderFn]:
        """Evaluation preprocessing (no augmentation) per modality."""
        names = modalities or self.modalities
        return {m: get_modality(m).decoder(self.config.towers[m], train=False) for m in names}

    def fields(self, modalities: list[str] | None = None) -> dict[str, list[str]]:
        """The shard member extensions each modality is read from."""
        return {m: list(get_modality(m).extensions) for m in (modalities or self.modalities)}

    @property
    def has_fusion(self) -> bool:
        return self.family != "fusion_free"

    @torch.no_grad()
    def itm_scores(self, query: str, context: str, tokens: dict[str, Tensor], token_mask: dict[str, Tensor]
                   ) -> Tensor:
        """``p(match)`` of each row's (query, context) pair from the fused summary state (ALBEF/BLIP ITM head);
        ``tokens``/``token_mask`` as `fuse` takes them (the outputs' `fusion_view`)."""
        if self.itm_head is None or self.itm is None:
            raise ToolError(f"{self.source} has no matching (ITM) head: the run was not trained with "
                             "objectives.matching")
        fused = self.model.fuse({query: tokens[query], context: tokens[context]},
                                {query: token_mask[query], context: token_mask[context]}, query)
        summary = fused_summary(self.model, fused, token_mask[query].bool()[:, : fused.shape[1]])
        return self.itm_head(summary.float()).softmax(-1)[:, 1]


def read_model_meta(path: str | Path) -> dict[str, Any]:
    cfg_file = Path(path) / CONFIG
    if not cfg_file.is_file():
        raise ToolError(f"not an exported model: {cfg_file} is missing (run `mmssl export RUN --out DIR` and pass "
                         "DIR/model)")
    meta = json.loads(cfg_file.read_text()).get("mmssl")
    if not isinstance(meta, dict) or meta.get("kind") != "model":
        raise ToolError(f"{cfg_file} is not a whole-model export (an encoder directory? pass <export>/model)")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ToolError(f"{cfg_file} uses export format {meta['format_version']}, newer than this mmssl")
    if meta.get("param_layout", 1) > PARAM_LAYOUT:
        raise ToolError(f"{cfg_file} uses parameter layout {meta['param_layout']}, newer than this mmssl's "
                        f"{PARAM_LAYOUT}")
    return meta


def check_state(expected: dict[str, Tensor], found: dict[str, Tensor], where: str, *,
                allowed_missing: list[str] | None = None) -> None:
    """Keys and shapes of ``found`` against the architecture's ``expected``; the error names the first mismatch."""
    unknown = sorted(set(found) - set(expected))
    if unknown:
        raise ToolError(f"{where} holds {unknown[0]!r}, which this architecture lacks: the weights are of a "
                         f"different architecture ({len(unknown)} unknown tensors)")
    missing = sorted(k for k in set(expected) - set(found) if not _is_under(k, allowed_missing or []))
    if missing:
        raise ToolError(f"{where} lacks {missing[0]!r} ({len(missing)} missing tensors): the weights are of a "
                         "different architecture")
    for key, value in found.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ToolError(f"{where}: {key!r} has shape {tuple(value.shape)}, the architecture expects "
                             f"{tuple(expected[key].shape)}: the weights are of a different architecture")


def load_model(path: str | Path, *, random_init: bool = False, seed: int = 0) -> LoadedModel:
    src = Path(path)
    meta = read_model_meta(src)
    cfg = model_config_from_dict(meta["model"], str(src / CONFIG))
    for tower_cfg in cfg.towers.values():
        for f in dataclasses.fields(tower_cfg):
            value = getattr(tower_cfg, f.name)
            if f.metadata.get("path") and isinstance(value, str) and value and not Path(value).is_absolute():
                setattr(tower_cfg, f.name, str(src / value))
    for prefix, ref in (meta.get("frozen") or {}).items():
        now = sha256_file(ref["path"])
        if now != ref["sha256"]:
            raise ToolError(f"{src / CONFIG}: frozen part {prefix!r} was trained with {ref['path']} "
                             f"(sha256 {ref['sha256'][:12]}…), which now has sha256 {now[:12]}…")
    model = build_model(cfg, seed=seed)
    if not random_init:
        state = load_file(str(src / WEIGHTS))
        if meta.get("param_layout", 1) < PARAM_LAYOUT:  # written before the attention layers were unified
            state = upgrade_state_dict(state)
        own = model.state_dict()
        check_state(own, state, str(src / WEIGHTS), allowed_missing=list(meta.get("frozen") or {}))
        model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in state.items()}})
    loaded = LoadedModel(model.eval(), cfg, src, itm=meta.get("itm"))
    if meta.get("itm"):
        head_state = load_file(str(src / ITM_HEAD))
        torch.manual_seed(seed + 1)
        head = nn.Linear(head_state["weight"].shape[1], 2)
        if not random_init:
            head.load_state_dict(head_state)
        loaded.itm_head = head.eval()
    return loaded

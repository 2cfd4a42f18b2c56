"""The fine-tuning model: an exported encoder's tower + a new linear classifier, its layer groups, freezing and
layer-wise learning-rate decay.

``Classifier``: ``logits = W · pool(tower(x)) + b`` with ``W`` initialised ``N(0, 2e-5²)`` (truncated) and
``b = 0``, the MAE fine-tuning head init (He et al., 2022); pooled features as the linear probe reads them.

Layer groups come from the tower's own ``group_matcher(coarse=False)`` (timm's contract: stem = 0, block i = i+1,
a final norm joins the last block); tower parameters it leaves unmatched (a ViT's ``fc_norm`` neck) also join the
last tower group, and the head is the top group ``L``. Layer-wise LR decay (BEiT, Bao et al. 2022; ELECTRA, Clark
et al. 2020): group ``g`` trains at ``lr_g = lr · decay^(L - layer_id(g))``, so the head gets ``lr`` and the stem
``lr · decay^L``. ``freeze``: ``"none"`` trains everything, ``"encoder"`` only the head (a linear probe trained by
SGD), an int ``k`` the last ``k`` tower groups + the head. A sub-module whose parameters are all frozen runs in
eval mode (a fixed feature extractor: no dropout, normalisation statistics untouched).
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn

from mmssl.architectures.encoder import Encoder
from mmssl.architectures.towers import Tower, prefixed_matcher
from mmssl.pretrain.engine import param_groups
from mmssl.tools.errors import ToolError

HEAD_INIT_STD = 2e-5
WEIGHTS_FILE = "model.safetensors"
CLASSIFIER_FILE = "classifier.json"
MATCH_PREVIOUS_GROUP = (99999,)  # timm's marker: merge into the preceding layer group


class Classifier(nn.Module):
    """An encoder tower with a linear classification head on its pooled features."""

    def __init__(self, tower: Tower, num_classes: int) -> None:
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(tower.num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Any) -> Tensor:
        return self.head(self.tower(x).pooled)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The tower's groups (prefixed ``tower.``), unmatched tower parameters merged into its last group, then
        the head as the top group."""
        matcher = prefixed_matcher("tower.", self.tower.group_matcher(coarse))
        return {**matcher, "neck": [(r"^tower\.", MATCH_PREVIOUS_GROUP)], "head": r"^head\."}

    def no_weight_decay(self) -> set[str]:
        return {f"tower.{name}" for name in self.tower.no_weight_decay()}


def layer_ids(model: Classifier) -> dict[str, int]:
    """Parameter name -> layer id (0 = stem ... ``L`` = head), from ``group_matcher(coarse=False)``."""
    return group_parameters(model, model.group_matcher(coarse=False), reverse=True)


def tower_groups(model: Classifier) -> int:
    """The number of tower layer groups ``L`` (the head's layer id)."""
    return max(layer_ids(model).values())


def parse_freeze(value: str | int, where: str = "--freeze") -> str | int:
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        k = int(value)
        if k < 0:
            raise ToolError(f"{where}: a number of layer groups must be >= 0, got {k}")
        return k
    if value not in ("none", "encoder"):
        raise ToolError(f"{where} must be 'none', 'encoder' or a number of layer groups k, got {value!r}")
    return value


def apply_freeze(model: Classifier, freeze: str | int, where: str = "--freeze") -> int:
    """Set ``requires_grad`` per ``freeze``; returns the number of trainable parameters."""
    freeze = parse_freeze(freeze, where)
    ids = layer_ids(model)
    top = max(ids.values())
    if isinstance(freeze, int) and freeze > top:
        raise ToolError(f"{where}={freeze} exceeds the {top} layer groups of the encoder (stem + blocks)")
    lowest = {"none": 0, "encoder": top}[freeze] if isinstance(freeze, str) else top - freeze
    for name, p in model.named_parameters():
        p.requires_grad_(ids[name] >= lowest)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def set_train_mode(model: nn.Module, training: bool) -> None:
    """``model.train(training)``, then every sub-module whose parameters are all frozen back to eval mode."""
    model.train(training)
    if not training:
        return
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def finetune_param_groups(model: Classifier, lr: float, weight_decay: float,
                          layer_decay: float | None) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters, each with its peak ``lr``: decay / no-decay (biases, norms,
    ``no_weight_decay``) and, with ``layer_decay``, one pair per layer group at ``lr · layer_decay^(L - id)``."""
    if layer_decay is None:
        return [{**g, "lr": lr} for g in param_groups(model, weight_decay)]
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay,
                                      no_weight_decay_list=sorted(model.no_weight_decay()))
    return [{**g, "lr": lr * g["lr_scale"]} for g in groups]


def check_layer_decay(layer_decay: float | None, where: str = "--layer-decay") -> None:
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ToolError(f"{where} must be in (0, 1], got {layer_decay}")


# ------------------------------------------------------------------------------------------ weights on disk
def frozen_fp32_copy(module: nn.Module) -> dict[str, Tensor]:
    """CPU copies of the frozen parameters, taken before a bf16 engine casts them (their fp32 values would be lost:
    frozen parameters have no fp32 master copy)."""
    return {n: p.detach().float().cpu().clone() for n, p in module.named_parameters() if not p.requires_grad}


def full_fp32_state(module: nn.Module, frozen: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The module's complete fp32 state on the CPU under any ZeRO stage: trainable parameters from DeepSpeed's fp32
    master copy (gathered across ranks), frozen ones from ``frozen`` (`frozen_fp32_copy`) or gathered from their
    partitions. Collective: every rank calls it, in the same order."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    frozen = frozen or {}
    state: dict[str, Tensor] = {}
    for name, p in module.named_parameters():
        if name in frozen:
            state[name] = frozen[name]
            continue
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            gathered = deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else nullcontext()
            with gathered:
                full = p.detach().clone()
        state[name] = full.detach().float().cpu().contiguous()
    persistent = set(module.state_dict().keys())
    for name, b in module.named_buffers():
        if name in persistent:
            value = b.detach().cpu()
            state[name] = (value.float() if value.is_floating_point() else value).contiguous().clone()
    return state


def save_weights_atomic(state: dict[str, Tensor], path: Path) -> None:
    """``safetensors`` through a temporary file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def write_classifier_info(out_dir: Path, info: dict[str, Any]) -> None:
    tmp = out_dir / f".{CLASSIFIER_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out_dir / CLASSIFIER_FILE)


def load_classifier(out_dir: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """A fine-tuning run's best classifier (eval mode) and its ``classifier.json`` (classes, label, encoder)."""
    out = Path(out_dir)
    info_file = out / CLASSIFIER_FILE
    if not info_file.is_file():
        raise ToolError(f"{out} holds no fine-tuned classifier ({CLASSIFIER_FILE} missing)")
    info = json.loads(info_file.read_text())
    encoder = Encoder.from_dir(info["encoder_dir"], random_init=True)  # architecture only: weights come next
    model = Classifier(encoder.tower, len(info["classes"]))
    model.load_state_dict(load_file(str(out / WEIGHTS_FILE)))
    return model.eval(), info

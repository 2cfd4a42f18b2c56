"""Parameter counts of a recipe's model and objectives, built on the meta device (no memory, no weights read).

Used to validate bundled full-scale recipes against the sizes their papers report: a ViT-B/16 CLIP builds here in
about a second because ``torch.device("meta")`` allocates no storage. The count is

    total      = Σ_p numel(p)  over  model.parameters() ∪ objective.parameters()   (each tensor once)
    trainable  = the same sum restricted to ``requires_grad`` tensors

so a momentum teacher (a frozen copy kept by the objective, ALBEF's momentum distillation; Li et al. 2021) adds to
``total`` but not to ``trainable``, which is what papers report.

A full-scale text tower's vocabulary comes from its tokenizer (`architectures.modalities.text`); to count a recipe
whose tokenizer is not on this machine, `placeholder_tokenizer` writes a word-level ``tokenizer.json`` of exactly
the paper's vocabulary size (with ``[PAD] [UNK] [CLS] [SEP] [MASK]``), which only fixes the embedding table's shape.
A stitched recipe's frozen parts are local files too: `placeholder_lm` writes a transformers directory holding only
the published ``config.json`` (and an empty ``model.safetensors``: a meta-device build reads no weight), and
`placeholder_weights` an empty ``.safetensors`` file for a frozen vision tower, so the model builds with its
published shapes (a shape-only build checks a weight file's header against the tower, strictly, and takes a file
holding no tensor for such a placeholder). Towers are the size their ``arch`` names unless a recipe sets size keys
(`architectures.modalities.base.TowerConfig`), so a count reads the size the recipe resolves to.
`count_prefixed` counts only the (trainable) parameters whose names start with one of the prefixes (``bridge.``:
a stitched model's trainable bridge; ``blocks.``: a unified encoder's shared layers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmssl.architectures.config import build_model
from mmssl.objectives.registry import build_objectives
from mmssl.pretrain.recipe import Recipe, load_recipe
from mmssl.tools.errors import ToolError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a recipe's model and of its objectives (heads, critics, teachers, temperatures)."""

    model_total: int
    model_trainable: int
    objectives_total: int
    objectives_trainable: int

    @property
    def total(self) -> int:
        return self.model_total + self.objectives_total

    @property
    def trainable(self) -> int:
        return self.model_trainable + self.objectives_trainable


def _count(params: Sequence[torch.nn.Parameter]) -> tuple[int, int]:
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def count_parameters(recipe: Recipe) -> ParameterCount:
    """Build ``recipe``'s model and objectives on the meta device (objectives bound to the model, so teachers and
    heads created at binding count) and count their parameters; a tensor shared between them counts once."""
    model, objectives = build_on_meta(recipe)
    seen = {id(p) for p in model.parameters()}
    model_total, model_trainable = _count(list(model.parameters()))
    own: list[torch.nn.Parameter] = []
    for objective in objectives.values():
        for p in objective.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                own.append(p)
    objectives_total, objectives_trainable = _count(own)
    return ParameterCount(model_total, model_trainable, objectives_total, objectives_trainable)


def build_on_meta(recipe: Recipe) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """``recipe``'s model and its objectives (bound to it), on the meta device."""
    with torch.device("meta"):
        model = build_model(recipe.model)
        objectives, _ = build_objectives(recipe.objectives, model.spec)
        for objective in objectives.values():
            objective.bind(model)
    return model, objectives


def count_prefixed(model: torch.nn.Module, prefixes: Sequence[str], *, trainable: bool = True) -> int:
    """Parameters of ``model`` (trainable ones only, unless ``trainable=False``) whose names start with any of
    ``prefixes``."""
    return sum(p.numel() for n, p in model.named_parameters()
               if n.startswith(tuple(prefixes)) and (p.requires_grad or not trainable))


def count_recipe(source: str | Path, overrides: Sequence[str] = ()) -> ParameterCount:
    """`count_parameters` of a recipe file or bundled recipe name with ``key=value`` overrides."""
    return count_parameters(load_recipe(source, overrides))


def placeholder_tokenizer(path: str | Path, vocab_size: int) -> Path:
    """Write a word-level ``tokenizer.json`` with exactly ``vocab_size`` entries (the specials first) to ``path``:
    a stand-in that gives a text tower its published embedding-table shape for counting, not for training."""
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ToolError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(spec))
    return out


def placeholder_lm(path: str | Path, config: dict[str, Any]) -> Path:
    """A transformers directory at ``path`` with ``config.json`` built from ``config`` (``model_type`` and the
    published fields) and an empty ``model.safetensors``: enough for a meta-device build of a frozen LM."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    fields = dict(config)
    AutoConfig.for_model(fields.pop("model_type"), **fields).save_pretrained(str(out))
    save_file({}, str(out / "model.safetensors"))
    return out


def placeholder_weights(path: str | Path) -> Path:
    """An empty ``.safetensors`` file: the frozen vision tower's weight path of a meta-device build (which checks
    a file with tensors against the tower's shapes, and takes one without for a placeholder)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({}, str(out))
    return out

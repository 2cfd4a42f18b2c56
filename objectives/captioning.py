"""Captioning through a frozen language model's own output head (Frozen, Tsimpoukelli et al. 2021; ClipCap,
Mokady et al. 2021; BLIP-2 stage 2, Li et al. 2023; Flamingo, Alayrac et al. 2022).

The model conditions its (frozen, causal) LM on the context modality (soft prompts or gated cross-attention) and
returns the LM's final states over the text positions as ``outputs.fused[target]`` (``h``, ``[B, L, d]``). The
objective owns no parameters: logits come from the model's own head (``model.lm_logits``), so only the bridge
learns. The loss is the next-token cross-entropy over the real target tokens of complete rows::

    L = 1/|S| Σ_{(b,t) ∈ S} -log softmax(lm_logits(h_{b,t-1}))[x_{b,t}],
    S = {(b,t): t >= 1, x_{b,t} not padding, context and text present in row b}

(the first text token, typically BOS/CLS, is given, not predicted). ``|S|`` is counted over all ranks
(`objectives.masking.global_mean`). Logits are computed only at the selected positions, so a large vocabulary
costs ``|S| x V``, not ``B x L x V``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from mmssl.objectives.base import LossOutput, ModelOutputs, ModelSpec, Objective, ObjectiveError, Requirements
from mmssl.objectives.masking import global_mean, presence, upcast


@runtime_checkable
class LanguageModelHead(Protocol):
    """A model that can turn its LM states into token logits (its own output head)."""

    def lm_logits(self, hidden: Tensor) -> Tensor: ...


def captioning_loss(hidden: Tensor, ids: Tensor, text_mask: Tensor, lm_logits: Callable[[Tensor], Tensor], *,
                    valid: Tensor | None = None, global_norm: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """The module docstring's loss: ``hidden`` ``[B, L, d]`` (states over the text), ``ids`` / ``text_mask``
    ``[B, L]``, ``valid`` ``bool[B]`` (complete rows). Returns ``(loss, metrics)``."""
    sel = text_mask[:, 1:].bool()
    if valid is not None:
        sel = sel & valid.bool()[:, None]
    logits = upcast(lm_logits(hidden[:, :-1][sel]))
    target = ids[:, 1:][sel]
    nll = F.cross_entropy(logits, target, reduction="sum")
    loss = global_mean(nll, sel.sum(), global_norm)
    with torch.no_grad():
        count = sel.sum().clamp_min(1)
        metrics = {"acc": (logits.argmax(-1) == target).sum() / count, "ppl": (nll.detach() / count).exp(),
                   "tokens": sel.sum().float()}
    return loss, metrics


@dataclass
class CaptioningConfig:
    """``objectives.captioning`` in a recipe."""

    weight: float = 1.0
    context: str = "image"
    target: str = "text"
    global_norm: bool = True


class CaptioningObjective(Objective):
    def __init__(self, cfg: CaptioningConfig, spec: ModelSpec) -> None:
        super().__init__()
        if cfg.context == cfg.target:
            raise ObjectiveError(f"context and target must differ, both are {cfg.context!r}")
        if cfg.target not in spec.vocab_sizes:
            raise ObjectiveError(f"target={cfg.target!r} is not a token-id modality (have: {sorted(spec.vocab_sizes)})")
        self.cfg = cfg
        self.requires = Requirements(modalities=(cfg.context, cfg.target), needs_fusion=True,
                                     gathers_across_ranks=cfg.global_norm)

    @classmethod
    def from_config(cls, cfg: CaptioningConfig, spec: ModelSpec | None = None) -> CaptioningObjective:
        if spec is None:
            raise ObjectiveError("captioning needs the model spec (the target's vocabulary)")
        return cls(cfg, spec)

    def check(self, spec: Any, where: str) -> None:
        if isinstance(spec, ModelSpec) and spec.fusion_dim is None:
            raise ObjectiveError(f"{where} needs a model that conditions a language model on {self.cfg.context!r} "
                                 f"(model.family: stitched with a causal LM); model.family={spec.family!r} has none")
        super().check(spec, where)

    def bind(self, model: Any) -> None:
        if not isinstance(model, LanguageModelHead) or not getattr(model, "has_lm_head", True):
            raise ObjectiveError(f"captioning needs a model with a causal LM output head (lm_logits); "
                                 f"{type(model).__name__} has none (load a *ForCausalLM language model)")

    def forward(self, outputs: ModelOutputs, batch: Any = None, model: Any = None) -> LossOutput:
        c, m = self.cfg.context, self.cfg.target
        if batch is None:
            raise ObjectiveError("captioning needs the batch (the target token ids)")
        if not isinstance(model, LanguageModelHead):
            raise ObjectiveError(f"captioning needs the model's lm_logits, got {type(model).__name__}")
        text = batch.inputs[m]
        ids, text_mask = text["input_ids"], text["attention_mask"]
        hidden = outputs.fused.get(m)
        if hidden is None:  # no context in this batch: nothing to caption (every rank still meets the collective)
            zero = torch.zeros((), device=ids.device)
            return LossOutput(loss=global_mean(zero, 0, self.cfg.global_norm), terms={"nll": zero},
                              metrics={"tokens": zero})
        rows, device = ids.shape[0], ids.device
        valid = presence(outputs, batch, c, rows, device) & presence(outputs, batch, m, rows, device)
        loss, metrics = captioning_loss(hidden, ids, text_mask, model.lm_logits, valid=valid,
                                        global_norm=self.cfg.global_norm)
        return LossOutput(loss=loss, terms={"nll": loss.detach()}, metrics=metrics)

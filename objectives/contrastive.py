"""Symmetric InfoNCE between modality pairs (CLIP, Radford et al. 2021; MMV, Alayrac et al. 2020 for 3+ modalities).

For a global batch of N pairs with L2-normalised embeddings ``a_i``, ``b_i`` and logit scale ``s = 1/τ``::

    L(a, b) = 1/(2N) Σ_i [ -log softmax_j(s·a_i·b_j)[i]  -  log softmax_j(s·b_i·a_j)[i] ]

Negatives are the other N-1 items of the *global* batch, gathered from all ranks with gradient; each rank computes
only its local rows ``i`` (``B x N`` logits, the scalable form of open_clip's ``local_loss=True,
gather_with_grad=True``) and returns ``(W/N)·Σ_{i local}``, so that the mean over ranks — what data-parallel
gradient averaging optimises — is exactly ``L``. Rows whose pair is incomplete (a modality absent, per
``present``) are left out of both the rows and the negatives. ``s = exp(clamp(log_s, 0, log(max_logit_scale)))``
is learnable, stored as a log-scale (CLIP initialises ``τ = 0.07``; the clamp keeps ``s ≤ 100``).

With several pairs the loss is their mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from objectives.base import LossOutput, ModelOutputs, ModelSpec, Objective, ObjectiveError, Requirements
from objectives.distributed import gather_no_grad, gather_with_grad, world


def contrastive_loss(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor | float,
    *,
    valid: Tensor | None = None,
    gather: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Symmetric InfoNCE over local rows against gathered columns (see the module docstring).

    Args:
        a, b: ``[B, E]`` embeddings of the two modalities on this rank (normalised here).
        logit_scale: ``s = 1/τ`` (already exponentiated).
        valid: ``bool[B]``, rows whose pair is complete; ``None`` means all.
        gather: take negatives from every rank (with gradient); otherwise only from this rank's batch.

    Returns:
        The loss to backpropagate on this rank and detached metrics (retrieval accuracy of the local rows).
    """
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    rank, size = world() if gather else (0, 1)
    rows = a.shape[0]
    all_valid = valid is None or bool(valid.all())
    if valid is None:
        valid = torch.ones(rows, dtype=torch.bool, device=a.device)
    if size > 1:
        a_cols, b_cols = gather_with_grad(a), gather_with_grad(b)
        valid_cols = gather_no_grad(valid)
        all_valid = bool(valid_cols.all())
    else:
        a_cols, b_cols, valid_cols = a, b, valid
    logits_ab = logit_scale * a @ b_cols.T
    logits_ba = logit_scale * b @ a_cols.T
    labels = torch.arange(rows, device=a.device) + rank * rows
    if not all_valid:
        dead = ~valid_cols.unsqueeze(0)
        logits_ab = logits_ab.masked_fill(dead, float("-inf"))
        logits_ba = logits_ba.masked_fill(dead, float("-inf"))
        keep = valid.nonzero().squeeze(1)
        logits_ab, logits_ba, labels = logits_ab[keep], logits_ba[keep], labels[keep]
    n_global = valid_cols.sum()
    per_row = F.cross_entropy(logits_ab, labels, reduction="none") + F.cross_entropy(logits_ba, labels,
                                                                                     reduction="none")
    loss = per_row.sum() / 2 * size / n_global.clamp_min(1)
    with torch.no_grad():
        metrics = {
            "acc_ab": (logits_ab.argmax(-1) == labels).float().mean() if labels.numel() else a.new_zeros(()),
            "acc_ba": (logits_ba.argmax(-1) == labels).float().mean() if labels.numel() else a.new_zeros(()),
        }
    return loss, metrics


@dataclass
class ContrastiveConfig:
    """``objectives.contrastive`` in a recipe."""

    weight: float = 1.0
    pairs: list[list[str]] = field(default_factory=list)
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    learn_temperature: bool = True
    gather: bool = True


class ContrastiveObjective(Objective):
    def __init__(
        self,
        pairs: Sequence[Sequence[str]],
        *,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        learn_temperature: bool = True,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if not pairs:
            raise ObjectiveError("contrastive objective needs at least one modality pair in `pairs`")
        for pair in pairs:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ObjectiveError(f"contrastive pair {list(pair)!r} must name two different modalities")
        if not init_temperature > 0:
            raise ObjectiveError(f"init_temperature must be > 0, got {init_temperature}")
        if max_logit_scale < 1:
            raise ObjectiveError(f"max_logit_scale must be >= 1, got {max_logit_scale}")
        self.pairs = [tuple(p) for p in pairs]
        self.max_log_scale = math.log(max_logit_scale)
        # shape [1], not []: DeepSpeed cannot broadcast 0-dim parameters
        self.log_logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)),
                                            requires_grad=learn_temperature)
        self.gather = gather
        self.requires = Requirements(
            modalities=tuple(dict.fromkeys(m for p in self.pairs for m in p)), gathers_across_ranks=gather
        )

    @classmethod
    def from_config(cls, cfg: ContrastiveConfig, spec: ModelSpec | None = None) -> ContrastiveObjective:
        return cls(cfg.pairs, init_temperature=cfg.init_temperature, max_logit_scale=cfg.max_logit_scale,
                   learn_temperature=cfg.learn_temperature, gather=cfg.gather)

    def logit_scale(self) -> Tensor:
        """``s = exp(clamp(log_s, 0, log max_logit_scale))`` as a 0-dim tensor."""
        return self.log_logit_scale.clamp(0.0, self.max_log_scale).exp().squeeze(0)

    def no_weight_decay(self) -> set[str]:
        return {"log_logit_scale"}

    def forward(self, outputs: ModelOutputs, batch: object = None, model: object = None) -> LossOutput:
        scale = self.logit_scale()
        terms: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {"logit_scale": scale.detach(), "temperature": 1.0 / scale.detach()}
        total = scale.new_zeros(())
        for m1, m2 in self.pairs:
            valid = outputs.present[m1] & outputs.present[m2]
            loss, pair_metrics = contrastive_loss(
                outputs.embeddings[m1], outputs.embeddings[m2], scale, valid=valid, gather=self.gather
            )
            total = total + loss
            terms[f"{m1}-{m2}"] = loss.detach()
            metrics.update({f"{m1}-{m2}/{k}": v for k, v in pair_metrics.items()})
        return LossOutput(loss=total / len(self.pairs), terms=terms, metrics=metrics)

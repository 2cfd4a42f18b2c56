"""Pairwise sigmoid loss between modality pairs (SigLIP, Zhai, Mustafa, Kolesnikov & Beyer 2023, "Sigmoid Loss for
Language Image Pre-Training").

For a global batch of N pairs with L2-normalised embeddings ``a_i``, ``b_j``, learnable scale ``t = exp(t')`` and
bias ``β``::

    L(a, b) = -1/N Σ_i Σ_j log σ( z_ij · (t · a_i·b_j + β) ),      z_ij = +1 if j ∈ P(i) else -1

with ``P(i) = {i}`` (or, with ``positives``, every sample sharing the ``batch.meta`` id of ``i``, as in the
contrastive objective's MIL-NCE option). Each pair contributes independently, so there is no softmax to normalise:
the paper initialises ``t' = log 10`` and ``β = -10`` so that the N²-N negatives do not dominate the first steps.
``t = exp(clamp(t', 0, log max_logit_scale))``; ``t'`` and ``β`` are parameters of shape [1].

Across ranks: each rank computes its local rows ``i`` against the columns ``b_j`` of the whole global batch
(gathered with gradient) and returns ``(W/N)·Σ_{i local}Σ_j``, so that the mean over ranks is exactly ``L`` and the
data-parallel averaged gradients equal the one-process gradient over the concatenated batch. With every row present
this per-rank value is identical to open_clip's ``SigLipLoss(rank, world_size)`` (which divides by the local batch
``B = N/W`` and exchanges the text features between neighbours instead of all-gathering them). Rows whose pair is
incomplete (per ``present``) drop out of both the rows and the columns, and ``N`` counts complete pairs only.

With several pairs the loss is their mean; the scale and bias are shared by the pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.objectives.base import (
    LossOutput,
    ModelOutputs,
    ModelSpec,
    Objective,
    ObjectiveError,
    Requirements,
    check_pairs,
    learned_scale,
)
from mmssl.objectives.distributed import gather_no_grad, gather_with_grad, world
from mmssl.objectives.ids import batch_meta_ids, check_meta_field, same_id


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def siglip_loss(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    valid: Tensor | None = None,
    gather: bool = True,
    positive_ids: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SigLIP over local rows of ``a`` against the gathered columns of ``b`` (see the module docstring).

    Args:
        a, b: ``[B, E]`` embeddings on this rank (normalised here; float64 stays float64).
        logit_scale: ``t`` (already exponentiated); logit_bias: ``β``.
        valid: ``bool[B]``, rows whose pair is complete; ``None`` means all.
        gather: columns from every rank (with gradient); otherwise only this rank's batch.
        positive_ids: ``int64[B]`` group ids: equal known ids are positives (``z = +1``) of each other.

    Returns:
        The loss to backpropagate on this rank and detached metrics: top-1 retrieval accuracy of the local rows and
        the mean sigmoid probability of positive and of negative pairs.
    """
    a = F.normalize(_at_least_float32(a), dim=-1)
    b = F.normalize(_at_least_float32(b), dim=-1)
    rank, size = world() if gather else (0, 1)
    rows = a.shape[0]
    if valid is None:
        valid = torch.ones(rows, dtype=torch.bool, device=a.device)
    # absent rows hold meaningless values: zero them so that nothing (not even a NaN) reaches the gradients
    a = a.masked_fill(~valid.unsqueeze(1), 0.0)
    b = b.masked_fill(~valid.unsqueeze(1), 0.0)
    b_cols = gather_with_grad(b) if size > 1 else b
    valid_cols = gather_no_grad(valid) if size > 1 else valid
    logits = logit_scale * a @ b_cols.T + logit_bias
    cols = torch.arange(b_cols.shape[0], device=a.device)
    positive = cols.unsqueeze(0) == (torch.arange(rows, device=a.device) + rank * rows).unsqueeze(1)
    if positive_ids is not None:
        ids = positive_ids.to(a.device)
        positive = positive | same_id(ids, gather_no_grad(ids) if size > 1 else ids)
    signs = positive.to(logits.dtype) * 2 - 1
    counted = valid.unsqueeze(1) & valid_cols.unsqueeze(0)
    per_pair = -F.logsigmoid(signs * logits)
    loss = per_pair.masked_fill(~counted, 0.0).sum() * size / valid_cols.sum().clamp_min(1)
    with torch.no_grad():  # masked means, not indexed ones: nothing waits for the device
        prob = torch.sigmoid(logits)
        top = logits.masked_fill(~valid_cols.unsqueeze(0), float("-inf")).argmax(-1, keepdim=True)
        pos_pairs, neg_pairs = counted & positive, counted & ~positive
        metrics = {
            "acc": (positive.gather(1, top).squeeze(1) & valid).sum() / valid.sum().clamp_min(1),
            "p_pos": (prob * pos_pairs).sum() / pos_pairs.sum().clamp_min(1),
            "p_neg": (prob * neg_pairs).sum() / neg_pairs.sum().clamp_min(1),
        }
    return loss, metrics


@dataclass
class SigLIPConfig:
    """``objectives.siglip`` in a recipe."""

    weight: float = 1.0
    pairs: list[list[str]] = field(default_factory=list)
    init_logit_scale: float = 10.0  # t = exp(t'), t' initialised to log(init_logit_scale)
    init_bias: float = -10.0
    max_logit_scale: float = 100.0
    learn_scale: bool = True
    learn_bias: bool = True
    gather: bool = True
    positives: str | None = None  # a batch.meta field: samples with the same value are positives (z = +1)


class SigLIPObjective(Objective):
    def __init__(
        self,
        pairs: Sequence[Sequence[str]],
        *,
        init_logit_scale: float = 10.0,
        init_bias: float = -10.0,
        max_logit_scale: float = 100.0,
        learn_scale: bool = True,
        learn_bias: bool = True,
        gather: bool = True,
        positives: str | None = None,
    ) -> None:
        super().__init__()
        self.pairs = check_pairs("siglip", pairs)
        if max_logit_scale < 1:
            raise ObjectiveError(f"max_logit_scale must be >= 1, got {max_logit_scale}")
        if not 1 <= init_logit_scale <= max_logit_scale:
            raise ObjectiveError(f"init_logit_scale must be in [1, max_logit_scale={max_logit_scale}], "
                                 f"got {init_logit_scale}")
        if not math.isfinite(init_bias):
            raise ObjectiveError(f"init_bias must be finite, got {init_bias}")
        check_meta_field("positives", positives)
        self.max_log_scale = math.log(max_logit_scale)
        # shape [1], not []: DeepSpeed cannot broadcast 0-dim parameters
        self.log_logit_scale = nn.Parameter(torch.full((1,), math.log(init_logit_scale)), requires_grad=learn_scale)
        self.logit_bias = nn.Parameter(torch.full((1,), float(init_bias)), requires_grad=learn_bias)
        self.gather = gather
        self.positives = positives
        self.requires = Requirements(
            modalities=tuple(dict.fromkeys(m for p in self.pairs for m in p)), gathers_across_ranks=gather
        )

    @classmethod
    def from_config(cls, cfg: SigLIPConfig, spec: ModelSpec | None = None) -> SigLIPObjective:
        if cfg.weight < 0:
            raise ObjectiveError(f"weight must be >= 0, got {cfg.weight}")
        return cls(cfg.pairs, init_logit_scale=cfg.init_logit_scale, init_bias=cfg.init_bias,
                   max_logit_scale=cfg.max_logit_scale, learn_scale=cfg.learn_scale, learn_bias=cfg.learn_bias,
                   gather=cfg.gather, positives=cfg.positives)

    def logit_scale(self) -> Tensor:
        """``t = exp(clamp(t', 0, log max_logit_scale))`` as a 0-dim tensor."""
        return learned_scale(self.log_logit_scale, self.max_log_scale)

    def no_weight_decay(self) -> set[str]:
        return {"log_logit_scale", "logit_bias"}

    def forward(self, outputs: ModelOutputs, batch: object = None, model: object = None) -> LossOutput:
        scale, bias = self.logit_scale(), self.logit_bias.squeeze(0)
        terms: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {"logit_scale": scale.detach(), "logit_bias": bias.detach()}
        pos_ids = None
        if self.positives:
            rows = outputs.embeddings[self.pairs[0][0]].shape[0]
            pos_ids = batch_meta_ids(batch, self.positives, rows, scale.device, option="positives")
        total = scale.new_zeros(())
        for m1, m2 in self.pairs:
            valid = outputs.present[m1] & outputs.present[m2]
            loss, pair_metrics = siglip_loss(outputs.embeddings[m1], outputs.embeddings[m2], scale, bias,
                                             valid=valid, gather=self.gather, positive_ids=pos_ids)
            total = total + loss
            terms[f"{m1}-{m2}"] = loss.detach()
            metrics.update({f"{m1}-{m2}/{k}": v for k, v in pair_metrics.items()})
        return LossOutput(loss=total / len(self.pairs), terms=terms, metrics=metrics)

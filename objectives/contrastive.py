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

Two options use a per-sample id computed from a ``batch.meta`` field (a stable 63-bit blake2b hash of the value,
`meta_ids`; a missing value is "unknown" and matches nothing), gathered over ranks without gradient:

* ``positives`` — multiple positives, MIL-NCE (Miech et al. 2020, "End-to-End Learning of Visual Representations
  from Uncurated Instructional Videos"): every sample with the same id is a positive of row ``i``,
  ``P(i) = {j : id_j = id_i} ∪ {i}``, and each direction's row term becomes::

      ℓ_ab(i) = -log( Σ_{j∈P(i)} exp(s·a_i·b_j) / Σ_j exp(s·a_i·b_j) )     (likewise ℓ_ba with a, b swapped)

  (the multiple-instance form of MIL-NCE's numerator, with the InfoNCE denominator over all columns).
* ``exclude_duplicates`` — known duplicates are not negatives: for row ``i`` the columns ``j ∉ P(i)`` with the same
  duplicate id as ``i`` are dropped from the denominator (logit ``-inf``); the positive(s) stay.

Both keep the loss exact across ranks (local rows against gathered columns, the ids of the columns gathered).
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


def contrastive_loss(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor | float,
    *,
    valid: Tensor | None = None,
    gather: bool = True,
    positive_ids: Tensor | None = None,
    duplicate_ids: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Symmetric InfoNCE over local rows against gathered columns (see the module docstring).

    Args:
        a, b: ``[B, E]`` embeddings of the two modalities on this rank (normalised here).
        logit_scale: ``s = 1/τ`` (already exponentiated).
        valid: ``bool[B]``, rows whose pair is complete; ``None`` means all.
        gather: take negatives from every rank (with gradient); otherwise only from this rank's batch.
        positive_ids: ``int64[B]`` group ids (MIL-NCE): equal known ids are positives of each other.
        duplicate_ids: ``int64[B]`` duplicate ids: equal known ids are removed from each other's negatives.

    Returns:
        The loss to backpropagate on this rank and detached metrics (retrieval accuracy of the local rows; with
        ``positive_ids`` a retrieval counts when the top column is any positive).
    """
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    rank, size = world() if gather else (0, 1)
    rows = a.shape[0]
    if valid is None:
        valid = torch.ones(rows, dtype=torch.bool, device=a.device)
    if size > 1:
        a_cols, b_cols = gather_with_grad(a), gather_with_grad(b)
        valid_cols = gather_no_grad(valid)
    else:
        a_cols, b_cols, valid_cols = a, b, valid
    logits_ab = logit_scale * a @ b_cols.T
    logits_ba = logit_scale * b @ a_cols.T
    labels = torch.arange(rows, device=a.device) + rank * rows
    if positive_ids is not None or duplicate_ids is not None:
        return _grouped_loss(logits_ab, logits_ba, labels, valid, valid_cols, positive_ids, duplicate_ids, size)
    # incomplete pairs are masked, not indexed out (no data-dependent shapes, nothing waits for the device): their
    # columns get -inf, their rows zeros (a finite row whose loss is weighted 0)
    keep, dead = valid.unsqueeze(1), ~valid_cols.unsqueeze(0)
    logits_ab = torch.where(keep, logits_ab.masked_fill(dead, float("-inf")), 0.0)
    logits_ba = torch.where(keep, logits_ba.masked_fill(dead, float("-inf")), 0.0)
    n_global = valid_cols.sum()
    per_row = F.cross_entropy(logits_ab, labels, reduction="none") + F.cross_entropy(logits_ba, labels,
                                                                                     reduction="none")
    loss = torch.where(valid, per_row, 0.0).sum() / 2 * size / n_global.clamp_min(1)
    with torch.no_grad():
        n_local = valid.sum().clamp_min(1)
        metrics = {
            "acc_ab": ((logits_ab.argmax(-1) == labels) & valid).sum() / n_local,
            "acc_ba": ((logits_ba.argmax(-1) == labels) & valid).sum() / n_local,
        }
    return loss, metrics


def _gathered(ids: Tensor, size: int) -> Tensor:
    return gather_no_grad(ids) if size > 1 else ids


def _grouped_loss(
    logits_ab: Tensor,
    logits_ba: Tensor,
    labels: Tensor,
    valid: Tensor,
    valid_cols: Tensor,
    positive_ids: Tensor | None,
    duplicate_ids: Tensor | None,
    size: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The MIL-NCE / duplicate-excluding form: ``logsumexp`` over the denominator minus over the positives."""
    cols = torch.arange(logits_ab.shape[1], device=logits_ab.device)
    positive = cols.unsqueeze(0) == labels.unsqueeze(1)
    if positive_ids is not None:
        positive = positive | same_id(positive_ids.to(labels.device), _gathered(positive_ids.to(labels.device), size))
    denominator = valid_cols.unsqueeze(0).expand_as(positive)
    if duplicate_ids is not None:
        dup = same_id(duplicate_ids.to(labels.device), _gathered(duplicate_ids.to(labels.device), size))
        denominator = denominator & ~(dup & ~positive)
    numerator = positive & denominator
    own = cols.unsqueeze(0) == labels.unsqueeze(1)  # an incomplete row keeps only its own column: a finite 0 term
    numerator = torch.where(valid.unsqueeze(1), numerator, own)
    denominator = torch.where(valid.unsqueeze(1), denominator, own)
    per_row = logits_ab.new_zeros(labels.shape[0])
    accs = {}
    n_local = valid.sum().clamp_min(1)
    for name, logits in (("acc_ab", logits_ab), ("acc_ba", logits_ba)):
        per_row = per_row + torch.logsumexp(logits.masked_fill(~denominator, float("-inf")), dim=-1)
        per_row = per_row - torch.logsumexp(logits.masked_fill(~numerator, float("-inf")), dim=-1)
        with torch.no_grad():
            top = logits.masked_fill(~denominator, float("-inf")).argmax(-1, keepdim=True)
            accs[name] = (numerator.gather(1, top).squeeze(1) & valid).sum() / n_local
    loss = torch.where(valid, per_row, 0.0).sum() / 2 * size / valid_cols.sum().clamp_min(1)
    return loss, accs


@dataclass
class ContrastiveConfig:
    """``objectives.contrastive`` in a recipe. ``positives`` / ``exclude_duplicates`` name a ``batch.meta`` field
    (e.g. ``text``: samples with the same transcript are positives / are not each other's negatives)."""

    weight: float = 1.0
    pairs: list[list[str]] = field(default_factory=list)
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    learn_temperature: bool = True
    gather: bool = True
    positives: str | None = None
    exclude_duplicates: str | None = None


class ContrastiveObjective(Objective):
    def __init__(
        self,
        pairs: Sequence[Sequence[str]],
        *,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        learn_temperature: bool = True,
        gather: bool = True,
        positives: str | None = None,
        exclude_duplicates: str | None = None,
    ) -> None:
        super().__init__()
        self.pairs = check_pairs("contrastive", pairs)
        if not init_temperature > 0:
            raise ObjectiveError(f"init_temperature must be > 0, got {init_temperature}")
        if max_logit_scale < 1:
            raise ObjectiveError(f"max_logit_scale must be >= 1, got {max_logit_scale}")
        check_meta_field("positives", positives)
        check_meta_field("exclude_duplicates", exclude_duplicates)
        self.max_log_scale = math.log(max_logit_scale)
        # shape [1], not []: DeepSpeed cannot broadcast 0-dim parameters
        self.log_logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)),
                                            requires_grad=learn_temperature)
        self.gather = gather
        self.positives = positives
        self.exclude_duplicates = exclude_duplicates
        self.requires = Requirements(
            modalities=tuple(dict.fromkeys(m for p in self.pairs for m in p)), gathers_across_ranks=gather
        )

    @classmethod
    def from_config(cls, cfg: ContrastiveConfig, spec: ModelSpec | None = None) -> ContrastiveObjective:
        return cls(cfg.pairs, init_temperature=cfg.init_temperature, max_logit_scale=cfg.max_logit_scale,
                   learn_temperature=cfg.learn_temperature, gather=cfg.gather, positives=cfg.positives,
                   exclude_duplicates=cfg.exclude_duplicates)

    def logit_scale(self) -> Tensor:
        """``s = exp(clamp(log_s, 0, log max_logit_scale))`` as a 0-dim tensor."""
        return learned_scale(self.log_logit_scale, self.max_log_scale)

    def no_weight_decay(self) -> set[str]:
        return {"log_logit_scale"}

    def forward(self, outputs: ModelOutputs, batch: object = None, model: object = None) -> LossOutput:
        scale = self.logit_scale()
        terms: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {"logit_scale": scale.detach(), "temperature": 1.0 / scale.detach()}
        total = scale.new_zeros(())
        rows, device = outputs.embeddings[self.pairs[0][0]].shape[0], scale.device
        pos_ids = dup_ids = None
        if self.positives:
            pos_ids = batch_meta_ids(batch, self.positives, rows, device, option="positives")
        if self.exclude_duplicates:
            dup_ids = batch_meta_ids(batch, self.exclude_duplicates, rows, device, option="exclude_duplicates")
        for m1, m2 in self.pairs:
            valid = outputs.present[m1] & outputs.present[m2]
            loss, pair_metrics = contrastive_loss(
                outputs.embeddings[m1], outputs.embeddings[m2], scale, valid=valid, gather=self.gather,
                positive_ids=pos_ids, duplicate_ids=dup_ids,
            )
            total = total + loss
            terms[f"{m1}-{m2}"] = loss.detach()
            metrics.update({f"{m1}-{m2}/{k}": v for k, v in pair_metrics.items()})
        return LossOutput(loss=total / len(self.pairs), terms=terms, metrics=metrics)

"""Contrastive loss with a momentum teacher, feature queues and momentum distillation (ALBEF's ITC, Li et al. 2021,
"Align before Fuse"; with ``alpha = 0`` it is cross-modal MoCo, He et al. 2020, with in-batch teacher keys).

For a global batch of N complete pairs with student embeddings ``a_i``, ``b_i``, teacher (momentum model)
embeddings ``a'_i``, ``b'_i`` and queues ``Q_a``, ``Q_b`` of past teacher embeddings (all L2-normalised), the
columns are teacher features — the current batch's followed by the queue — ``C_b = [b'_1 .. b'_N ; Q_b]``,
``C_a = [a'_1 .. a'_N ; Q_a]``, and with logit scale ``s = 1/τ``::

    p_i  = softmax_j(s · a_i · C_b[j])          (student, a -> b)
    q_i  = softmax_j(s · a'_i · C_b[j])         (teacher, no gradient)
    y_i  = (1 - α) · onehot(i) + α · q_i        (momentum distillation)
    L_ab = -(1/N) Σ_i Σ_j y_ij log p_ij,        L_ba likewise with a <-> b,     L = (L_ab + L_ba) / 2

After the loss, the current teacher embeddings of the global batch are pushed into the queues (only in training
mode; evaluation reads the queues without changing them). The teacher is updated after every optimizer step by
``after_step``: ``θ_t ← m·θ_t + (1-m)·θ_s`` over parameters of the same name (``m = 0.995``).

Distributed exactness: the teacher columns of the current batch are gathered from every rank (no gradient: they
are teacher features), so every rank sees the same ``C``; each rank computes its local rows and returns
``(W/N)·Σ_{i local}(ℓ_ab,i + ℓ_ba,i)/2``, so the mean over ranks is ``L`` and the data-parallel average of the
gradients is ``∇L`` (as in contrastive.py). The queues are written with the gathered rows, so every rank holds the
identical queue. Rows whose pair is incomplete (``present`` False) are neither rows, nor columns, nor enqueued.
Queue slots not yet written, and queue entries whose sample id (``dedup_by``: the sample key, or a ``batch.meta``
field such as the transcript) equals the id of a sample of the current global batch, are left out of the columns:
a stale copy of a current sample would otherwise be a false negative (a small dataset seen for several epochs
refills the queue with the same samples). The queue size need not be a multiple of the global batch (the queue
wraps around, see queue.py). The logit scale is learnable (log-scale of shape [1], clamped to
``[1, max_logit_scale]``) or fixed (``learn_temperature: false``); the teacher's targets use the same ``s``,
detached. ``alpha`` may be ramped linearly from 0 over the first ``alpha_warmup_steps`` optimizer steps (ALBEF
ramps it over the first epoch).

The teacher: ``bind(model)`` deep-copies the whole model (towers and projection heads; it is called as
``teacher(inputs, present)`` and its ``embeddings`` are read), freezes it and registers it as the submodule
``teacher``, so it is checkpointed with the objective. It has no mode of its own: like ALBEF's momentum models and
MoCo's key encoder it is in the same train / eval mode as the rest of the task (dropout active, BatchNorm using
batch statistics and updating the teacher's own running statistics; buffers are not averaged). Its float
parameters also have float32 master copies (buffers of ``teacher_fp32``) on which the EMA is computed: DeepSpeed's
bf16 mode casts every parameter, frozen ones included, to bf16, where a ``(1-m) = 0.005`` update is below half an
ulp and would be lost. While a teacher parameter is float32 on the master's device the two share storage (no
extra memory); otherwise the teacher runs in the training dtype and costs one extra float32 copy of the model.

**ZeRO stages 0-2 only.** ZeRO-3 partitions every parameter across ranks, the teacher's included, so the copy and
the EMA would operate on shards; ``after_step`` raises if it meets a partitioned parameter.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
    subset_presence,
)
from mmssl.objectives.distributed import gather_no_grad, world
from mmssl.objectives.ids import UNKNOWN_ID, meta_ids
from mmssl.objectives.queue import FeatureQueue


class MomentumLoss(NamedTuple):
    """The loss on this rank, detached metrics, and the gathered normalised teacher embeddings of the global
    batch with its ``valid`` mask (what goes into the queues)."""

    loss: Tensor
    metrics: dict[str, Tensor]
    a_teacher: Tensor
    b_teacher: Tensor
    valid: Tensor


def _distill_ce(logits: Tensor, teacher_logits: Tensor, pos: Tensor, alpha: float | Tensor) -> Tensor:
    """``-Σ_j y_ij log softmax(logits)_ij`` with ``y = (1-α)·onehot(pos) + α·softmax(teacher_logits)``."""
    log_p = F.log_softmax(logits, dim=-1)
    nll = -log_p.gather(1, pos.unsqueeze(1)).squeeze(1)
    if isinstance(alpha, float) and alpha == 0:
        return nll
    soft = -(F.softmax(teacher_logits, dim=-1) * log_p.masked_fill(teacher_logits == float("-inf"), 0.0)).sum(-1)
    return (1 - alpha) * nll + alpha * soft


def momentum_contrastive_loss(
    a: Tensor,
    b: Tensor,
    a_teacher: Tensor,
    b_teacher: Tensor,
    logit_scale: Tensor | float,
    *,
    queue_a: Tensor | None = None,
    queue_b: Tensor | None = None,
    queue_a_live: Tensor | None = None,
    queue_b_live: Tensor | None = None,
    alpha: float | Tensor = 0.4,
    valid: Tensor | None = None,
    gather: bool = True,
) -> MomentumLoss:
    """ALBEF's ITC with momentum distillation over local rows (see the module docstring).

    Args:
        a, b: ``[B, E]`` student embeddings on this rank (normalised here).
        a_teacher, b_teacher: ``[B, E]`` teacher embeddings of the same rows (normalised here; no gradient).
        logit_scale: ``s = 1/τ`` (already exponentiated); the teacher targets use it detached.
        queue_a, queue_b: ``[Q, E]`` past teacher embeddings appended to the columns of ``b -> a`` and ``a -> b``
            (normalised here), with ``queue_a_live`` / ``queue_b_live`` (``bool[Q]``, default all) marking the
            slots to use: the caller drops unwritten or duplicate slots.
        alpha: weight of the teacher's soft targets (a number, or a 0-dim tensor while it ramps up).
        valid: ``bool[B]``, rows whose pair is complete; ``None`` means all.
        gather: take the current-batch columns from every rank; otherwise only from this rank's batch.

    Incomplete rows and unused columns are masked, never indexed out, so the shapes do not depend on the data and
    nothing waits for the device.
    """
    dtype = torch.promote_types(a.dtype, torch.float32)  # bf16 -> float32; float64 stays (gradcheck)
    a = F.normalize(a.to(dtype), dim=-1)
    b = F.normalize(b.to(dtype), dim=-1)
    rows = a.shape[0]
    with torch.no_grad():
        a_t = F.normalize(a_teacher.detach().to(dtype), dim=-1)
        b_t = F.normalize(b_teacher.detach().to(dtype), dim=-1)
        s_t = logit_scale.detach() if isinstance(logit_scale, Tensor) else logit_scale
        if valid is None:
            valid = torch.ones(rows, dtype=torch.bool, device=a.device)
        rank, size = world() if gather else (0, 1)
        if size > 1:
            a_t_all, b_t_all, valid_all = gather_no_grad(a_t), gather_no_grad(b_t), gather_no_grad(valid)
        else:
            a_t_all, b_t_all, valid_all = a_t, b_t, valid
        pos = torch.arange(rows, device=a.device) + rank * rows
        empty = a.new_zeros(0, a.shape[1])
        cols_a = torch.cat([a_t_all, empty if queue_a is None else F.normalize(queue_a.to(dtype), dim=-1)])
        cols_b = torch.cat([b_t_all, empty if queue_b is None else F.normalize(queue_b.to(dtype), dim=-1)])

        def live(queue: Tensor | None, mask: Tensor | None) -> Tensor:
            if queue is None:
                return valid_all
            return torch.cat([valid_all, mask if mask is not None else valid_all.new_ones(queue.shape[0])])

        dead_a, dead_b = ~live(queue_a, queue_a_live), ~live(queue_b, queue_b_live)
        keep = valid.unsqueeze(1)  # an incomplete row's logits are zeros (finite; its loss is weighted 0)
        teacher_ab = torch.where(keep, (s_t * a_t @ cols_b.T).masked_fill(dead_b, float("-inf")), 0.0)
        teacher_ba = torch.where(keep, (s_t * b_t @ cols_a.T).masked_fill(dead_a, float("-inf")), 0.0)
    logits_ab = torch.where(keep, (logit_scale * a @ cols_b.T).masked_fill(dead_b, float("-inf")), 0.0)
    logits_ba = torch.where(keep, (logit_scale * b @ cols_a.T).masked_fill(dead_a, float("-inf")), 0.0)
    per_row = _distill_ce(logits_ab, teacher_ab, pos, alpha) + _distill_ce(logits_ba, teacher_ba, pos, alpha)
    n_global = valid_all.sum()
    loss = torch.where(valid, per_row, 0.0).sum() / 2 * size / n_global.clamp_min(1)
    with torch.no_grad():
        n_local = valid.sum().clamp_min(1)
        metrics = {
            "acc_ab": ((logits_ab.argmax(-1) == pos) & valid).sum() / n_local,
            "acc_ba": ((logits_ba.argmax(-1) == pos) & valid).sum() / n_local,
            "queue_cols": (~dead_b[valid_all.shape[0]:]).sum().to(dtype),
        }
    return MomentumLoss(loss, metrics, a_t_all, b_t_all, valid_all)


@torch.no_grad()
def ema_update(teacher: Tensor, student: Tensor, momentum: float) -> None:
    """``teacher ← m·teacher + (1-m)·student`` in place (computed in ``teacher``'s dtype)."""
    teacher.mul_(momentum).add_(student.detach().to(teacher.dtype), alpha=1.0 - momentum)


@dataclass
class MomentumContrastiveConfig:
    """``objectives.momentum_contrastive`` in a recipe."""

    weight: float = 1.0
    pairs: list[list[str]] = field(default_factory=list)
    queue_size: int = 4096  # per pair and side; 0: in-batch teacher columns only
    momentum: float = 0.995
    alpha: float = 0.4
    alpha_warmup_steps: int = 0
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    learn_temperature: bool = True
    dedup_by: str = "key"  # "key" (batch.keys), "none", or the name of a batch.meta field (e.g. "text")


def _master_name(param_name: str) -> str:
    return param_name.replace(".", "__")


class MomentumContrastiveObjective(Objective):
    teacher: nn.Module | None
    steps: Tensor
    max_zero_stage = 2  # the teacher is a full copy of the model, updated in place

    def __init__(
        self,
        pairs: Sequence[Sequence[str]],
        *,
        embed_dim: int,
        queue_size: int = 4096,
        momentum: float = 0.995,
        alpha: float = 0.4,
        alpha_warmup_steps: int = 0,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        learn_temperature: bool = True,
        dedup_by: str = "key",
    ) -> None:
        super().__init__()
        self.pairs = check_pairs("momentum_contrastive", pairs)
        if queue_size < 0:
            raise ObjectiveError(f"queue_size must be >= 0, got {queue_size}")
        if not 0.0 <= momentum <= 1.0:
            raise ObjectiveError(f"momentum must be in [0, 1], got {momentum}")
        if not 0.0 <= alpha <= 1.0:
            raise ObjectiveError(f"alpha must be in [0, 1], got {alpha}")
        if alpha_warmup_steps < 0:
            raise ObjectiveError(f"alpha_warmup_steps must be >= 0, got {alpha_warmup_steps}")
        if not init_temperature > 0:
            raise ObjectiveError(f"init_temperature must be > 0, got {init_temperature}")
        if max_logit_scale < 1:
            raise ObjectiveError(f"max_logit_scale must be >= 1, got {max_logit_scale}")
        if embed_dim < 1:
            raise ObjectiveError(f"embed_dim must be >= 1, got {embed_dim}")
        if not dedup_by:
            raise ObjectiveError("dedup_by must be 'key', 'none' or a batch.meta field name, got ''")
        self.momentum, self.alpha, self.alpha_warmup_steps = momentum, alpha, alpha_warmup_steps
        self.dedup_by = dedup_by
        self.max_log_scale = math.log(max_logit_scale)
        # shape [1], not []: DeepSpeed cannot broadcast 0-dim parameters
        self.log_logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)),
                                            requires_grad=learn_temperature)
        self.queues = nn.ModuleDict({
            self._pair_key(m1, m2): nn.ModuleDict({m1: FeatureQueue(queue_size, embed_dim),
                                                   m2: FeatureQueue(queue_size, embed_dim)})
            for m1, m2 in self.pairs
        })
        self.register_buffer("steps", torch.zeros(1, dtype=torch.int64))  # optimizer steps seen (alpha ramp)
        self.embed_dim = embed_dim
        self.register_module("teacher", None)
        self.teacher_fp32 = nn.Module()
        self.modalities = tuple(dict.fromkeys(m for p in self.pairs for m in p))
        self.requires = Requirements(modalities=self.modalities, gathers_across_ranks=True)

    @staticmethod
    def _pair_key(m1: str, m2: str) -> str:
        return f"{m1}-{m2}"

    @classmethod
    def from_config(cls, cfg: MomentumContrastiveConfig, spec: ModelSpec | None = None) -> MomentumContrastiveObjective:
        if spec is None:
            raise ObjectiveError("momentum_contrastive needs the model spec (embed_dim sizes its queues)")
        return cls(cfg.pairs, embed_dim=spec.embed_dim, queue_size=cfg.queue_size, momentum=cfg.momentum,
                   alpha=cfg.alpha, alpha_warmup_steps=cfg.alpha_warmup_steps, init_temperature=cfg.init_temperature,
                   max_logit_scale=cfg.max_logit_scale, learn_temperature=cfg.learn_temperature,
                   dedup_by=cfg.dedup_by)

    def logit_scale(self) -> Tensor:
        """``s = exp(clamp(log_s, 0, log max_logit_scale))`` as a 0-dim tensor."""
        return learned_scale(self.log_logit_scale, self.max_log_scale)

    def current_alpha(self) -> float | Tensor:
        """``α``, or while it ramps up ``α·min(1, steps / alpha_warmup_steps)`` as a 0-dim tensor (on the device,
        where the step count is)."""
        if self.alpha_warmup_steps == 0:
            return self.alpha
        return self.alpha * (self.steps.float() / self.alpha_warmup_steps).clamp(max=1.0).squeeze(0)

    def no_weight_decay(self) -> set[str]:
        return {"log_logit_scale"}

    # teacher -----------------------------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> None:
        """Make the momentum teacher: a frozen deep copy of ``model`` plus float32 EMA masters (see the docstring)."""
        teacher = copy.deepcopy(model)
        masters = nn.Module()
        for name, p in teacher.named_parameters():
            p.requires_grad_(False)
            p.grad = None
            if p.is_floating_point():
                key = _master_name(name)
                if key in masters._buffers:
                    raise ObjectiveError(f"momentum_contrastive: parameter names collide after mapping ({name!r})")
                # float32 parameters share storage with their master; others get a float32 copy
                masters.register_buffer(key, p.data if p.dtype == torch.float32 else p.data.float())
        self.teacher = teacher
        self.teacher_fp32 = masters

    def _require_teacher(self) -> nn.Module:
        if self.teacher is None:
            raise ObjectiveError("momentum_contrastive has no teacher: call bind(model) before forward/after_step")
        return self.teacher

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """EMA of the teacher towards ``model`` (same parameter names), then one more optimizer step counted."""
        teacher = self._require_teacher()
        student = dict(model.named_parameters())
        for name, t in teacher.named_parameters():
            s = student.get(name)
            if s is None:
                raise ObjectiveError(f"momentum_contrastive: the model has no parameter {name!r} for the teacher's")
            if hasattr(s, "ds_id") or hasattr(t, "ds_id"):
                raise ObjectiveError("momentum_contrastive needs train.zero_stage 0-2: ZeRO-3 partitions the "
                                     f"teacher's parameters ({name!r})")
            if s.shape != t.shape:
                raise ObjectiveError(f"momentum_contrastive: {name!r} has shape {tuple(s.shape)} in the model but "
                                     f"{tuple(t.shape)} in the teacher")
            if not t.is_floating_point():
                t.copy_(s)
                continue
            master = self.teacher_fp32._buffers[_master_name(name)]
            ema_update(master, s, self.momentum)
            if t.data_ptr() == master.data_ptr():
                continue
            if t.dtype == master.dtype and t.device == master.device:
                t.data = master  # re-share the storage a dtype cast or device move split
            else:
                t.copy_(master)
        self.steps += 1

    # loss --------------------------------------------------------------------------------------------------
    def _ids(self, batch: Any, rows: int, device: torch.device) -> Tensor | None:
        if self.dedup_by == "none":
            return None
        if self.dedup_by == "key":
            names = list(getattr(batch, "keys", None) or [])
            if len(names) != rows:  # unknown ids; still a tensor, so every rank takes part in the same gathers
                return torch.full((rows,), UNKNOWN_ID, dtype=torch.int64, device=device)
        else:
            meta = getattr(batch, "meta", None) or {}
            if self.dedup_by not in meta:
                raise ObjectiveError(f"dedup_by={self.dedup_by!r} is not a batch.meta field (have {sorted(meta)})")
            names = list(meta[self.dedup_by])
        return meta_ids(names, device)

    @staticmethod
    def _live(queue: FeatureQueue, current_ids: Tensor | None) -> Tensor:
        """``bool[K]``: the queue slots to use as columns (written, and not a sample of the current batch)."""
        live = queue.mask()
        if current_ids is not None:
            live &= ~(torch.isin(queue.ids, current_ids) & (queue.ids != UNKNOWN_ID))
        return live

    def forward(self, outputs: ModelOutputs, batch: Any = None, model: object = None) -> LossOutput:
        teacher = self._require_teacher()
        if batch is None:
            raise ObjectiveError("momentum_contrastive needs the batch: the teacher encodes batch.inputs")
        scale = self.logit_scale()
        alpha = self.current_alpha()
        emb = outputs.embeddings
        rows = next((emb[m].shape[0] for m in self.modalities if m in emb), len(batch.keys))
        device = scale.device
        inputs: Mapping[str, Any] = {m: batch.inputs[m] for m in self.modalities if m in batch.inputs}
        present = subset_presence(batch.present, list(inputs))
        with torch.no_grad():
            t_emb = teacher(inputs, present).embeddings if inputs else {}
        ids = self._ids(batch, rows, device)
        ids_all = gather_no_grad(ids) if ids is not None else None

        def get(d: Mapping[str, Tensor], m: str) -> tuple[Tensor, Tensor]:
            if m not in d or m not in outputs.present:  # no sample of this rank's batch carries m
                return scale.new_zeros(rows, self.embed_dim), torch.zeros(rows, dtype=torch.bool, device=device)
            return d[m], outputs.present[m]

        total = scale.new_zeros(())
        terms: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {"logit_scale": scale.detach(), "temperature": 1.0 / scale.detach(),
                                      "alpha": alpha if isinstance(alpha, Tensor) else scale.new_tensor(alpha)}
        for m1, m2 in self.pairs:
            (a, pa), (b, pb) = get(emb, m1), get(emb, m2)
            (a_t, _), (b_t, _) = get(t_emb, m1), get(t_emb, m2)
            queues = self.queues[self._pair_key(m1, m2)]
            result = momentum_contrastive_loss(
                a, b, a_t, b_t, scale, queue_a=queues[m1].feats, queue_b=queues[m2].feats,
                queue_a_live=self._live(queues[m1], ids_all), queue_b_live=self._live(queues[m2], ids_all),
                alpha=alpha, valid=pa & pb,
            )
            if self.training:  # after the loss: the current batch is never its own queue entry
                queues[m1].enqueue(result.a_teacher, ids_all, result.valid, gather=False)
                queues[m2].enqueue(result.b_teacher, ids_all, result.valid, gather=False)
            total = total + result.loss
            terms[f"{m1}-{m2}"] = result.loss.detach()
            metrics.update({f"{m1}-{m2}/{k}": v for k, v in result.metrics.items()})
        return LossOutput(loss=total / len(self.pairs), terms=terms, metrics=metrics)

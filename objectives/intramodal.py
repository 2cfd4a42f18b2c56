"""Intra-modal NT-Xent between two augmented views of one modality (SimCLR, Chen, Kornblith, Norouzi & Hinton 2020;
as the self-supervised branch of SLIP, Mu, Kirillov, Wagner & Xie 2022).

For a global batch of N samples, each with two views ``m`` and ``m@1``, the 2N L2-normalised projections ``z_k`` are
the anchors; for anchor ``i`` with other view ``j``::

    ℓ(i, j) = -log( exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ) ),       L = 1/(2N) Σ_{anchors i} ℓ(i, j(i))

``sim`` is the cosine similarity and the 2N-2 other views of the batch are the negatives. ``τ`` is fixed (SLIP and
our default: 0.1) or learnable (stored as ``log 1/τ``, shape [1], clamped to ``1/τ ≤ max_logit_scale``).

Across ranks: both views are gathered from every rank with gradient; each rank computes its 2B local anchors against
the 2N gathered columns and returns ``(W/(2N))·Σ_{local anchors}``, so that the mean over ranks is ``L`` and the
data-parallel averaged gradients equal the one-process gradient over the concatenated batch. Samples missing either
view (per ``present``) drop out of the anchors and the columns; N counts complete samples.

Projector (``projector: mlp``, as SLIP's separate SSL head): ``g(h) = W₂ ReLU(W₁ h)``, ``spec.feature_dims[m] →
hidden_dim → proj_dim`` (SimCLR's formula; SLIP's 3-layer head with BatchNorm is not used, so that absent rows and
per-rank batch statistics cannot leak into the loss), one per modality, owned by the objective and applied to
``outputs.pooled[m]`` and ``outputs.pooled["m@1"]``. ``projector: none`` uses the model's ``embeddings`` instead.

With several modalities the loss is their mean. ``weight: 0`` (or leaving the objective out) switches it off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.objectives.base import (
    VIEW_SEP,
    LossOutput,
    ModelOutputs,
    ModelSpec,
    Objective,
    ObjectiveError,
    Requirements,
    learned_scale,
)
from mmssl.objectives.distributed import gather_no_grad, gather_with_grad, world

PROJECTORS = ("none", "mlp")


def second_view(modality: str) -> str:
    return f"{modality}{VIEW_SEP}1"


def nt_xent_loss(
    z1: Tensor,
    z2: Tensor,
    temperature: Tensor | float,
    *,
    valid: Tensor | None = None,
    gather: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """NT-Xent over the local anchors of both views against the gathered views (see the module docstring).

    Args:
        z1, z2: ``[B, E]`` the two views' projections on this rank (normalised here; float64 stays float64).
        temperature: ``τ``.
        valid: ``bool[B]``, samples with both views; ``None`` means all.
        gather: negatives from every rank (with gradient); otherwise only this rank's batch.

    Returns:
        The loss to backpropagate on this rank and detached metrics: the accuracy of finding the other view.
    """
    dtype = torch.promote_types(z1.dtype, torch.float32)
    z1, z2 = F.normalize(z1.to(dtype), dim=-1), F.normalize(z2.to(dtype), dim=-1)
    rank, size = world() if gather else (0, 1)
    rows = z1.shape[0]
    if valid is None:
        valid = torch.ones(rows, dtype=torch.bool, device=z1.device)
    # absent rows hold meaningless values: zero them so that nothing (not even a NaN) reaches the gradients
    z1, z2 = z1.masked_fill(~valid.unsqueeze(1), 0.0), z2.masked_fill(~valid.unsqueeze(1), 0.0)
    if size > 1:
        cols1, cols2, valid_cols = gather_with_grad(z1), gather_with_grad(z2), gather_no_grad(valid)
    else:
        cols1, cols2, valid_cols = z1, z2, valid
    n = cols1.shape[0]
    cols = torch.cat([cols1, cols2])  # [2N]: first views, then second views
    anchors = torch.cat([z1, z2])  # [2B]
    logits = anchors @ cols.T / temperature
    g = torch.arange(rows, device=z1.device) + rank * rows
    self_idx, pos_idx = torch.cat([g, g + n]), torch.cat([g + n, g])
    col_idx = torch.arange(2 * n, device=z1.device)
    dead = (col_idx.unsqueeze(0) == self_idx.unsqueeze(1)) | ~valid_cols.repeat(2).unsqueeze(0)
    logits = logits.masked_fill(dead, float("-inf"))
    keep = valid.repeat(2).nonzero().squeeze(1)
    logits, pos_idx = logits[keep], pos_idx[keep]
    per_anchor = F.cross_entropy(logits, pos_idx, reduction="none")
    loss = per_anchor.sum() * size / (2 * valid_cols.sum()).clamp_min(1)
    with torch.no_grad():
        acc = (logits.argmax(-1) == pos_idx).float().mean() if keep.numel() else logits.new_zeros(())
    return loss, {"acc": acc}


@dataclass
class IntraModalConfig:
    """``objectives.intramodal`` in a recipe; needs ``data.views: {<modality>: 2}`` for each listed modality."""

    weight: float = 1.0
    modalities: list[str] = field(default_factory=list)
    temperature: float = 0.1
    learn_temperature: bool = False
    max_logit_scale: float = 100.0
    projector: str = "mlp"  # "mlp": a head owned by the objective on the pooled features; "none": the embeddings
    proj_dim: int = 128
    hidden_dim: int = 512
    proj_layers: int = 2  # linear layers of the MLP projector (SimCLR 2; SLIP / SimCLR v2: 3)
    proj_batch_norm: bool = False  # BatchNorm after each hidden layer (SLIP), statistics over the rank's rows
    gather: bool = True


def mlp_projector(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, batch_norm: bool = False) -> nn.Module:
    """SimCLR's projection head ``W₂ ReLU(W₁ h)`` (``layers=2``); with ``layers=L``, ``L-1`` hidden layers of
    ``hidden_dim``, each ``Linear [-> BatchNorm] -> ReLU``, then a linear map to ``out_dim`` (SLIP's image MLP:
    768 -> 4096 -> 4096 -> 256 with BatchNorm)."""
    if layers < 1:
        raise ObjectiveError(f"proj_layers must be >= 1, got {layers}")
    parts: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        parts += [nn.Linear(width, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if batch_norm else []),
                  nn.ReLU(inplace=True)]
        width = hidden_dim
    return nn.Sequential(*parts, nn.Linear(width, out_dim))


class IntraModalObjective(Objective):
    def __init__(
        self,
        modalities: Sequence[str],
        *,
        temperature: float = 0.1,
        learn_temperature: bool = False,
        max_logit_scale: float = 100.0,
        projector: str = "mlp",
        feature_dims: dict[str, int] | None = None,
        proj_dim: int = 128,
        hidden_dim: int = 512,
        proj_layers: int = 2,
        proj_batch_norm: bool = False,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if not modalities:
            raise ObjectiveError("intramodal objective needs at least one modality in `modalities`")
        if len(set(modalities)) != len(modalities) or any(VIEW_SEP in m or not m for m in modalities):
            raise ObjectiveError(f"modalities {list(modalities)!r} must be distinct tower names (not views 'm@1')")
        if not temperature > 0:
            raise ObjectiveError(f"temperature must be > 0, got {temperature}")
        if max_logit_scale < 1 or 1.0 / temperature > max_logit_scale:
            raise ObjectiveError(f"max_logit_scale={max_logit_scale} must be >= 1 and >= 1/temperature "
                                 f"(temperature={temperature})")
        if projector not in PROJECTORS:
            raise ObjectiveError(f"projector must be one of {list(PROJECTORS)}, got {projector!r}")
        self.modalities = list(modalities)
        self.projector = projector
        self.projectors = nn.ModuleDict()
        if projector == "mlp":
            if proj_dim < 1 or hidden_dim < 1:
                raise ObjectiveError(f"proj_dim and hidden_dim must be >= 1, got {proj_dim} and {hidden_dim}")
            if feature_dims is None:
                raise ObjectiveError("projector: 'mlp' needs the model spec (feature_dims) to size its heads")
            for m in self.modalities:
                if m not in feature_dims:
                    raise ObjectiveError(f"modality {m!r} has no pooled features to project "
                                         f"(model towers: {sorted(feature_dims)})")
                self.projectors[m] = mlp_projector(feature_dims[m], hidden_dim, proj_dim, proj_layers, proj_batch_norm)
        self.max_log_scale = math.log(max_logit_scale)
        # shape [1], not []: DeepSpeed cannot broadcast 0-dim parameters
        self.log_inv_temperature = nn.Parameter(torch.full((1,), math.log(1.0 / temperature)),
                                                requires_grad=learn_temperature)
        self.gather = gather
        self.requires = Requirements(
            modalities=tuple(v for m in self.modalities for v in (m, second_view(m))), gathers_across_ranks=gather
        )

    @classmethod
    def from_config(cls, cfg: IntraModalConfig, spec: ModelSpec | None = None) -> IntraModalObjective:
        if cfg.weight < 0:
            raise ObjectiveError(f"weight must be >= 0, got {cfg.weight}")
        return cls(cfg.modalities, temperature=cfg.temperature, learn_temperature=cfg.learn_temperature,
                   max_logit_scale=cfg.max_logit_scale, projector=cfg.projector,
                   feature_dims=dict(spec.feature_dims) if spec is not None else None, proj_dim=cfg.proj_dim,
                   hidden_dim=cfg.hidden_dim, proj_layers=cfg.proj_layers, proj_batch_norm=cfg.proj_batch_norm,
                   gather=cfg.gather)

    def temperature(self) -> Tensor:
        """``τ = 1/exp(clamp(log 1/τ, 0, log max_logit_scale))`` as a 0-dim tensor."""
        return learned_scale(self.log_inv_temperature, self.max_log_scale).reciprocal()

    def no_weight_decay(self) -> set[str]:
        return {"log_inv_temperature"}

    def _views(self, outputs: ModelOutputs, m: str) -> tuple[Tensor, Tensor]:
        source = outputs.pooled if self.projector == "mlp" else outputs.embeddings
        view = second_view(m)
        if view not in source or m not in source:
            raise ObjectiveError(f"intramodal needs the views {m!r} and {view!r} in the model outputs "
                                 f"(got {sorted(source)}); set data.views: {{{m}: 2}}")
        if self.projector == "mlp":
            return self.projectors[m](source[m]), self.projectors[m](source[view])
        return source[m], source[view]

    def forward(self, outputs: ModelOutputs, batch: object = None, model: object = None) -> LossOutput:
        tau = self.temperature()
        terms: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {"temperature": tau.detach()}
        total = tau.new_zeros(())
        for m in self.modalities:
            z1, z2 = self._views(outputs, m)
            valid = outputs.present[m] & outputs.present[second_view(m)]
            loss, m_metrics = nt_xent_loss(z1, z2, tau, valid=valid, gather=self.gather)
            total = total + loss
            terms[m] = loss.detach()
            metrics.update({f"{m}/{k}": v for k, v in m_metrics.items()})
        return LossOutput(loss=total / len(self.modalities), terms=terms, metrics=metrics)

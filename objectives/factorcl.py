"""Factorized contrastive learning (FactorCL; Liang, Deng, Ma, Zou, Morency, Salakhutdinov, "Factorized Contrastive
Learning: Going Beyond Multi-view Redundancy", NeurIPS 2023; P. P. Liang's thesis, ch. 4).

Two modalities ``X1``, ``X2`` (pooled tower features, or the model's embeddings) go through four heads owned by the
objective: shared ``Z_S1 = g_s1(X1)``, ``Z_S2 = g_s2(X2)`` and unique ``Z_U1 = g_u1(X1)``, ``Z_U2 = g_u2(X2)``
(eqs. 4.6-4.7; MLPs ``D -> hidden_dim -> proj_dim``). ``Y`` is the label (``variant: supervised``) or, in
FactorCL-SSL, the augmented pair ``(X1', X2')`` (the views ``m@1``, encoded by the same towers and heads). The
estimates, for ``i = 1, 2`` (eqs. 4.8-4.9, Algorithm 2)::

    S   = I_NCE(Z_S1; Z_S2)   - I_NCE-CLUB(Z_S1; Z_S2 | Y)
    U_i = I_NCE(Z_Ui; Y_i)    - I_NCE-CLUB(Z_U1; Z_U2) + I_NCE(Z_U1; Z_U2 | Y)
    L   = -(S + U1 + U2)

with ``Y_i = Z_Ui' = g_ui(X_i')`` (SSL, the ``I_NCE(X_i; X_i')`` term) or ``Y_i = onehot(y)`` (supervised,
``I_NCE(X_i; Y)``). A conditional term concatenates the conditioning variable with each side (eqs. 4.13-4.16):
SSL ``[Z_1, Z_1'] , [Z_2, Z_2']``; supervised ``[Z_1, onehot(y)], [Z_2, onehot(y)]``. Note that ``-(S+U1+U2)``
counts ``I_NCE-CLUB(Z_U1; Z_U2)`` and ``I_NCE(Z_U1; Z_U2 | Y)`` twice, as the equations do; the authors' released
code (``RUSModel`` / ``RUSAugment``) sums each of the six estimates once.

Estimators, on a batch of ``N`` pairs with critic scores ``s_ij = f(a_i, b_j)``::

    I_NCE(a; b)      = 1/N Σ_i [ s_ii - log( 1/|M_i| Σ_{j in M_i} exp s_ij ) ]      (eqs. 4.10, 4.13, 4.15)
    I_NCE-CLUB(a; b) = mean_i [ s*_ii - mean_{j in M_i, j != i} s*_ij ]                (eqs. 4.11, 4.14, 4.16)

``M_i`` (the negatives of row ``i``, plus ``i``) is the whole batch for the unconditional terms, so that
``I_NCE <= log N`` for any critic. For the conditional terms the equations draw negatives from ``p(x2 | y)``:
``conditional_negatives: same_label`` (the supervised default) keeps ``M_i = {j : y_j = y_i}`` (rows alone in their
label add 0 to I_NCE and are left out of I_NCE-CLUB); ``batch`` uses every row, as the released code does, and is
the only choice for SSL, where ``p(x2 | x1', x2')`` cannot be sampled (one view per sample). Caveat of ``batch``:
with whole-batch negatives a concatenated critic estimates the dependence of ``[Z1, C]`` and ``[Z2, C]``, which is
``>= I(Z1; Z2)``, not ``I(Z1; Z2 | C)``; so in the estimator's limit ``S <= 0`` and the conditional term acts as a
regulariser (in the synthetic tests the SSL ``S`` stays ≈ 0 while ``U1``, ``U2`` grow; with ``same_label`` and a
label holding a ``K``-valued shared factor, ``S`` grows towards ``log K``).

Every critic is separable, ``f(a, b) = <ĝ(a), ĥ(b)> / τ`` with MLPs ``g, h`` and ``ĝ = g/|g|`` (the form the thesis
gives for the conditional critics, ``g([x1, x1'])ᵀ h([x2, x2'])``); one critic per estimate (six). The CLUB negatives
are the off-diagonal pairs (samples of ``p(a)p(b)``); the released code averages over all ``N²`` pairs, which is
``(N-1)/N`` times ours.

``f*`` of I_NCE-CLUB is the critic *optimised by NCE*. The released code alternates two optimisers: encoders,
heads and the four NCE critics minimise ``L``; the two CLUB critics then take a step on ``-I_NCE`` (their
"learning loss"). Here one optimiser and one backward do both with stop-gradients:

* in ``L`` the CLUB critics are applied with detached parameters, so encoders and heads get ``dL/dZ`` (they minimise
  the upper bounds) and the CLUB critics get nothing from ``L``;
* ``fit = Σ_club -I_NCE(f_club(a.detach(), b.detach()))`` trains the CLUB critics only (inputs detached);
* the returned loss is ``L + (fit - fit.detach())``: its value is exactly ``-(S+U1+U2)``, its gradient is ``∇L`` for
  encoders, heads and NCE critics, and ``∇fit`` for the CLUB critics. (Both are scaled by the objective's weight.)

Rows where either modality (or, for SSL, either view; for supervised, the label) is absent are dropped before any
estimate. With fewer than two rows the loss is a zero computed through every head and critic (zero gradients).

Labels (supervised): ``batch.meta[label]`` per row; an integer is taken ``mod num_labels``; anything else goes to
``crc32(utf-8 of str(value)) mod num_labels`` (stable across ranks, runs and restarts; distinct strings may collide,
which merges their classes — raise ``num_labels`` to make that unlikely); ``None`` marks the row absent.

Distributed: the estimates use this rank's batch only (no cross-rank gather); each rank's loss is its local
FactorCL loss and data-parallel averaging optimises the mean of the local losses (``gathers_across_ranks=False``).
"""

from __future__ import annotations

import math
import numbers
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.objectives.base import LossOutput, ModelOutputs, ModelSpec, Objective, ObjectiveError, Requirements

NCE_BOUNDS = ("nce_x1x2", "nce_x1y", "nce_x2y", "nce_x1x2_cond")
CLUB_BOUNDS = ("club_x1x2", "club_x1x2_cond")
VARIANTS = ("ssl", "supervised")
FEATURES = ("pooled", "embeddings")
NEGATIVES = ("batch", "same_label")


def info_nce(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """``I_NCE = 1/N Σ_i [s_ii - logsumexp_{j in M_i} s_ij + log |M_i|]`` for ``scores[i, j] = f(a_i, b_j)``,
    ``[N, N]``; ``M_i`` is every ``j`` or, with ``mask``, ``{j : mask[i, j]}`` (the diagonal is always kept)."""
    n = scores.shape[0]
    if mask is None:
        return (scores.diagonal() - scores.logsumexp(dim=1)).mean() + math.log(n)
    mask = mask | torch.eye(n, dtype=torch.bool, device=scores.device)
    lse = scores.masked_fill(~mask, float("-inf")).logsumexp(dim=1)
    return (scores.diagonal() - lse + mask.sum(1).to(scores.dtype).log()).mean()


def nce_club(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """``I_NCE-CLUB = mean_i [s_ii - mean_{j in M_i, j != i} s_ij]`` (positives minus product-of-marginals pairs);
    without ``mask`` that is ``mean_i s_ii - mean_{i != j} s_ij``. With ``mask``, rows without a negative are left
    out; ``0`` if no row has one."""
    n = scores.shape[0]
    diag = scores.diagonal()
    if mask is None:
        return diag.mean() - (scores.sum() - diag.sum()) / max(n * (n - 1), 1)
    neg = mask & ~torch.eye(n, dtype=torch.bool, device=scores.device)
    count = neg.sum(1)
    rows = count > 0
    if not bool(rows.any()):
        return scores.sum() * 0.0
    neg_mean = (scores * neg).sum(1)[rows] / count[rows].to(scores.dtype)
    return (diag[rows] - neg_mean).mean()


def _at_least_f32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def factorcl_loss(
    scores: Mapping[str, Tensor],
    club_fit_scores: Mapping[str, Tensor] | None = None,
    cond_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The FactorCL loss from critic score matrices (see the module docstring).

    Args:
        scores: ``[N, N]`` score matrices under the keys ``NCE_BOUNDS + CLUB_BOUNDS``; the CLUB ones computed with
            the CLUB critics' parameters detached.
        club_fit_scores: the same CLUB critics (live parameters) on detached inputs, keyed by ``CLUB_BOUNDS``;
            ``-I_NCE`` of these trains the critics without changing the loss value.
        cond_mask: ``bool[N, N]``, the pairs the conditional estimates may use as negatives (same label);
            ``None``: every pair.

    Returns:
        ``(loss, terms)``; ``loss`` has the value ``-(S + U1 + U2)``; ``terms`` holds ``S``, ``U1``, ``U2`` and every
        bound (detached).
    """
    def mask(k: str) -> Tensor | None:
        return cond_mask if k.endswith("_cond") else None

    b = {k: info_nce(_at_least_f32(scores[k]), mask(k)) for k in NCE_BOUNDS}
    b.update({k: nce_club(_at_least_f32(scores[k]), mask(k)) for k in CLUB_BOUNDS})
    shared = b["nce_x1x2"] - b["club_x1x2_cond"]
    not_shared = -b["club_x1x2"] + b["nce_x1x2_cond"]
    u1 = b["nce_x1y"] + not_shared
    u2 = b["nce_x2y"] + not_shared
    loss = -(shared + u1 + u2)
    terms = {"S": shared.detach(), "U1": u1.detach(), "U2": u2.detach()}
    terms.update({k: v.detach() for k, v in b.items()})
    if club_fit_scores:
        fit = sum(-info_nce(_at_least_f32(club_fit_scores[k]), mask(k)) for k in CLUB_BOUNDS if k in club_fit_scores)
        loss = loss + (fit - fit.detach())
        terms["club_fit"] = fit.detach()
    return loss, terms


def label_ids(values: Sequence[Any], num_labels: int) -> tuple[list[int], list[bool]]:
    """Per row: an id in ``[0, num_labels)`` (ints modulo, strings by crc32 modulo) and whether it is present."""
    ids, ok = [], []
    for v in values:
        if v is None:
            ids.append(0)
            ok.append(False)
        elif isinstance(v, numbers.Integral) or (isinstance(v, float) and v.is_integer()):
            ids.append(int(v) % num_labels)
            ok.append(True)
        else:
            ids.append(zlib.crc32(str(v).encode("utf-8")) % num_labels)
            ok.append(True)
    return ids, ok


class MLP(nn.Module):
    """``Linear -> ReLU -> Linear`` with its parameters held directly (ZeRO-3 gathers them in this module's own
    forward) so that ``forward(x, frozen=True)`` can read them detached."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.w0 = nn.Parameter(torch.empty(hidden_dim, in_dim))
        self.b0 = nn.Parameter(torch.empty(hidden_dim))
        self.w1 = nn.Parameter(torch.empty(out_dim, hidden_dim))
        self.b1 = nn.Parameter(torch.empty(out_dim))
        for w, b in ((self.w0, self.b0), (self.w1, self.b1)):  # nn.Linear's initialisation
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            nn.init.uniform_(b, -1 / math.sqrt(w.shape[1]), 1 / math.sqrt(w.shape[1]))

    def forward(self, x: Tensor, frozen: bool = False) -> Tensor:
        w0, b0, w1, b1 = (p.detach() if frozen else p for p in (self.w0, self.b0, self.w1, self.b1))
        return F.linear(F.relu(F.linear(x.to(w0.dtype), w0, b0)), w1, b1)


class SeparableCritic(nn.Module):
    """``f(a_i, b_j) = <g(a_i)/|g(a_i)|, h(b_j)/|h(b_j)|> / τ`` for every pair: ``[N, N]`` scores."""

    def __init__(self, a_dim: int, b_dim: int, hidden_dim: int, out_dim: int, temperature: float) -> None:
        super().__init__()
        self.g = MLP(a_dim, hidden_dim, out_dim)
        self.h = MLP(b_dim, hidden_dim, out_dim)
        self.temperature = temperature

    def forward(self, a: Tensor, b: Tensor, frozen: bool = False) -> Tensor:
        ga = F.normalize(self.g(a, frozen), dim=-1)
        hb = F.normalize(self.h(b, frozen), dim=-1)
        return _at_least_f32(ga) @ _at_least_f32(hb).T / self.temperature


@dataclass
class FactorCLConfig:
    """``objectives.factorcl`` in a recipe."""

    weight: float = 1.0
    modalities: list[str] = field(default_factory=list)
    variant: str = "ssl"
    label: str | None = None
    num_labels: int = 64
    hidden_dim: int = 256
    proj_dim: int = 128
    temperature: float = 0.1
    feature: str = "pooled"
    conditional_negatives: str | None = None  # None: "same_label" for supervised, "batch" for ssl


class FactorCLObjective(Objective):
    def __init__(
        self,
        modalities: Sequence[str],
        feature_dims: Mapping[str, int],
        *,
        variant: str = "ssl",
        label: str | None = None,
        num_labels: int = 64,
        hidden_dim: int = 256,
        proj_dim: int = 128,
        temperature: float = 0.1,
        feature: str = "pooled",
        conditional_negatives: str | None = None,
    ) -> None:
        super().__init__()
        if len(modalities) != 2 or modalities[0] == modalities[1]:
            raise ObjectiveError(f"modalities must name two different modalities, got {list(modalities)!r}")
        if variant not in VARIANTS:
            raise ObjectiveError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if variant == "supervised" and not label:
            raise ObjectiveError("label must name a batch.meta field (e.g. 'family') when variant is 'supervised'")
        if variant == "ssl" and label:
            raise ObjectiveError(f"label={label!r} is only used with variant: supervised (got variant: ssl)")
        if feature not in FEATURES:
            raise ObjectiveError(f"feature must be one of {FEATURES}, got {feature!r}")
        if conditional_negatives is None:
            conditional_negatives = "same_label" if variant == "supervised" else "batch"
        if conditional_negatives not in NEGATIVES:
            raise ObjectiveError(f"conditional_negatives must be one of {NEGATIVES}, got {conditional_negatives!r}")
        if conditional_negatives == "same_label" and variant != "supervised":
            raise ObjectiveError("conditional_negatives: same_label needs variant: supervised (labels to group by)")
        if not temperature > 0:
            raise ObjectiveError(f"temperature must be > 0, got {temperature}")
        for name, value in (("hidden_dim", hidden_dim), ("proj_dim", proj_dim)):
            if value < 1:
                raise ObjectiveError(f"{name} must be >= 1, got {value}")
        if variant == "supervised" and num_labels < 2:
            raise ObjectiveError(f"num_labels must be >= 2, got {num_labels}")
        for m in modalities:
            if m not in feature_dims:
                raise ObjectiveError(f"modalities: {m!r} is not a model tower (towers: {sorted(feature_dims)})")
        self.m1, self.m2 = modalities
        self.variant, self.label, self.num_labels = variant, label, num_labels
        self.feature, self.conditional_negatives = feature, conditional_negatives
        d1, d2 = feature_dims[self.m1], feature_dims[self.m2]
        self.head_s1, self.head_u1 = MLP(d1, hidden_dim, proj_dim), MLP(d1, hidden_dim, proj_dim)
        self.head_s2, self.head_u2 = MLP(d2, hidden_dim, proj_dim), MLP(d2, hidden_dim, proj_dim)
        y_dim = proj_dim if variant == "ssl" else num_labels
        c_dim = proj_dim + y_dim  # [Z, Z'] or [Z, onehot(y)]
        dims = {"nce_x1x2": (proj_dim, proj_dim), "nce_x1y": (proj_dim, y_dim), "nce_x2y": (proj_dim, y_dim),
                "nce_x1x2_cond": (c_dim, c_dim), "club_x1x2": (proj_dim, proj_dim), "club_x1x2_cond": (c_dim, c_dim)}
        self.critics = nn.ModuleDict(
            {k: SeparableCritic(a, b, hidden_dim, proj_dim, temperature) for k, (a, b) in dims.items()}
        )
        views = (f"{self.m1}@1", f"{self.m2}@1") if variant == "ssl" else ()
        self.requires = Requirements(modalities=(self.m1, self.m2, *views), gathers_across_ranks=False)

    @classmethod
    def from_config(cls, cfg: FactorCLConfig, spec: ModelSpec | None = None) -> FactorCLObjective:
        if spec is None:
            raise ObjectiveError("factorcl sizes its heads from the model spec; none was given")
        dims = dict(spec.feature_dims) if cfg.feature == "pooled" else {m: spec.embed_dim for m in spec.modalities}
        return cls(cfg.modalities, dims, variant=cfg.variant, label=cfg.label, num_labels=cfg.num_labels,
                   hidden_dim=cfg.hidden_dim, proj_dim=cfg.proj_dim, temperature=cfg.temperature,
                   feature=cfg.feature, conditional_negatives=cfg.conditional_negatives)

    def _labels(self, batch: Any, rows: int, device: torch.device) -> tuple[Tensor, Tensor]:
        meta = getattr(batch, "meta", None)
        if meta is None:
            raise ObjectiveError(f"variant: supervised reads batch.meta[{self.label!r}], but no batch was given")
        if self.label not in meta:
            raise ObjectiveError(f"label={self.label!r} is not a batch.meta field (fields: {sorted(meta)})")
        ids, ok = label_ids(meta[self.label], self.num_labels)
        if len(ids) != rows:
            raise ObjectiveError(f"batch.meta[{self.label!r}] has {len(ids)} entries for {rows} rows")
        return torch.tensor(ids, device=device), torch.tensor(ok, dtype=torch.bool, device=device)

    def score_matrices(
        self, outputs: ModelOutputs, batch: Any = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor | None, int]:
        """``(scores, club_fit_scores, cond_mask, rows)`` for `factorcl_loss`, on the rows where everything the
        variant needs is present (see the module docstring)."""
        feats = outputs.pooled if self.feature == "pooled" else outputs.embeddings
        x1, x2 = feats[self.m1], feats[self.m2]
        valid = outputs.present[self.m1] & outputs.present[self.m2]
        if self.variant == "ssl":
            v1, v2 = feats[f"{self.m1}@1"], feats[f"{self.m2}@1"]
            valid = valid & outputs.present[f"{self.m1}@1"] & outputs.present[f"{self.m2}@1"]
        else:
            y, has_label = self._labels(batch, x1.shape[0], x1.device)
            valid = valid & has_label
        keep = valid.nonzero().squeeze(1)
        n = int(keep.numel())
        x1, x2 = x1[keep], x2[keep]
        zs1, zs2, zu1, zu2 = self.head_s1(x1), self.head_s2(x2), self.head_u1(x1), self.head_u2(x2)
        if self.variant == "ssl":
            v1, v2 = v1[keep], v2[keep]
            y1, y2 = self.head_u1(v1), self.head_u2(v2)  # Z_U1', Z_U2'
            cond_s = (self.head_s1(v1), self.head_s2(v2))  # Z_S1', Z_S2'
            cond_u = (y1, y2)
            cond_mask = None
        else:
            y = y[keep]
            cond_mask = y[:, None] == y[None, :] if self.conditional_negatives == "same_label" else None
            onehot = F.one_hot(y, self.num_labels).to(zs1.dtype)
            y1 = y2 = onehot
            cond_s = cond_u = (onehot, onehot)
        cs1, cs2 = torch.cat([zs1, cond_s[0]], dim=1), torch.cat([zs2, cond_s[1]], dim=1)
        cu1, cu2 = torch.cat([zu1, cond_u[0]], dim=1), torch.cat([zu2, cond_u[1]], dim=1)
        c = self.critics
        scores = {
            "nce_x1x2": c["nce_x1x2"](zs1, zs2),
            "nce_x1y": c["nce_x1y"](zu1, y1),
            "nce_x2y": c["nce_x2y"](zu2, y2),
            "nce_x1x2_cond": c["nce_x1x2_cond"](cu1, cu2),
            "club_x1x2": c["club_x1x2"](zu1, zu2, frozen=True),
            "club_x1x2_cond": c["club_x1x2_cond"](cs1, cs2, frozen=True),
        }
        fit = {
            "club_x1x2": c["club_x1x2"](zu1.detach(), zu2.detach()),
            "club_x1x2_cond": c["club_x1x2_cond"](cs1.detach(), cs2.detach()),
        }
        return scores, fit, cond_mask, n

    def forward(self, outputs: ModelOutputs, batch: Any = None, model: Any = None) -> LossOutput:
        scores, fit, cond_mask, n = self.score_matrices(outputs, batch)
        device = scores["nce_x1x2"].device
        metrics = {"rows": torch.tensor(float(n), device=device)}
        if n < 2:  # no estimate; a zero through every head and critic (their forwards ran on the 0 or 1 rows)
            zero = sum(s.sum() for s in (*scores.values(), *fit.values())) * 0.0
            return LossOutput(loss=zero, terms={}, metrics=metrics)
        loss, terms = factorcl_loss(scores, fit, cond_mask)
        metrics["log_n"] = torch.tensor(math.log(n), device=device)
        return LossOutput(loss=loss, terms=terms, metrics=metrics)

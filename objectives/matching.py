"""Cross-modal matching (ITM of ALBEF, Li et al. 2021 "Align before Fuse" §3.2; audio-visual correspondence of
Arandjelović & Zisserman 2017 "Look, Listen and Learn").

A linear head ``h: R^F -> R^2`` owned by the objective reads the fused state of the query modality's first token
(CLS), ``f(q, c) = fuse(q tokens, c tokens)[0]``, and predicts matched (1) / unmatched (0). A model may name
another summary position (`objectives.base.fused_summary`): a stitched causal LM reads its last real text token,
``f(q, c) = LM([P(c); E(q)])[k + len(q) - 1]`` (BLIP-2's ITM, with the frozen LM in place of the Q-Former's text
half), and its fusion inputs are the LM's input embeddings and soft prompts (`objectives.base.fusion_view`).

For every valid local row ``i`` of the global batch of ``N`` rows (both modalities present) the items are::

    (q_i, c_i, 1)      the positive pair
    (q_i, c_j, 0)      j ~ p(j | i) = softmax_{j ∈ A_i}(s · q̂_i·ĉ_j)   a hard negative context for query i
    (q_k, c_i, 0)      k ~ p(k | i) = softmax_{k ∈ A_i}(s · ĉ_i·q̂_k)   a hard negative query for context i

    L = 1/M Σ_items CE(h(f(q, c)), y)          M = number of items in the global batch

with ``q̂, ĉ`` the L2-normalised, detached contrastive embeddings, ``s = 1/temperature``, and ``A_i`` the
candidates: every valid row of the *global* batch but ``i`` itself (and, with ``exclude_duplicates: <meta field>``,
rows whose field equals row ``i``'s, e.g. the same transcript: false negatives). ``negatives: random`` draws
uniformly from ``A_i``. Unlike ALBEF (``softmax + 1e-5``, then the diagonal zeroed) the distribution here is exactly
the softmax restricted to ``A_i``. A row with no candidate contributes only its positive.

Distribution: negative tokens come from every rank, gathered with gradient (`gather_with_grad`, after padding the
token axis to the longest over ranks, padding masked), so a negative's gradient flows back to the rank that owns
it. Each rank fuses only its local 3B items and returns ``(W/M)·Σ_{local items} CE``: the mean over ranks is ``L``
and, with DeepSpeed's gradient averaging, every gradient equals the one-process gradient on the global batch.

Reproducible sampling, identical for any world size: the draws use inverse-CDF sampling with uniforms
``u ∈ [0, 1)^{2×N}`` from a CPU ``torch.Generator`` seeded by ``(seed, step)`` — ``step`` is ``batch.index``
(the stream position, so a resumed run draws the same negatives; a call counter when the batch has none) —
generated for all ``N`` global rows on every rank; rank ``r`` uses the slice of its rows. So global row ``g``
draws the same negative on 1 rank and on 2 ranks (up to float rounding of the similarities).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

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
    base_modality,
    fused_summary,
    fusion_view,
)
from mmssl.objectives.distributed import gather_no_grad, gather_with_grad, host_all_gather, world
from mmssl.objectives.ids import batch_meta_ids, to_device

FuseFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor], str], Tensor]


@dataclass
class MatchingNegatives:
    """Global row indices (``rank·B + i``) of the negatives drawn for the local rows; -1 where none was drawn."""

    context: Tensor  # long [B]: the negative context of query row i
    query: Tensor  # long [B]: the negative query of context row i


def negative_uniforms(seed: int, step: int, n: int, stream: int = 0) -> Tensor:
    """``float64 [2, n]`` uniforms in ``[0, 1)`` for the ``n`` global rows, a pure function of its arguments."""
    digest = hashlib.blake2b(f"matching:{seed}:{step}:{stream}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.rand(2, n, generator=g, dtype=torch.float64)


def negative_candidates(valid_rows: Tensor, valid_cols: Tensor, rows: Tensor, groups_rows: Tensor | None = None,
                        groups_cols: Tensor | None = None) -> Tensor:
    """``bool [R, N]``: column j may be drawn as a negative for row i (global index ``rows[i]``): both valid,
    ``j != rows[i]``, and not in the same duplicate group (group ids ``< 0`` mean "no group")."""
    cols = torch.arange(valid_cols.shape[0], device=valid_cols.device)
    allowed = valid_rows[:, None] & valid_cols[None, :] & (cols[None, :] != rows[:, None])
    if groups_rows is not None and groups_cols is not None:
        dup = (groups_rows[:, None] == groups_cols[None, :]) & (groups_rows[:, None] >= 0)
        allowed = allowed & ~dup
    return allowed


def negative_probs(sim: Tensor | None, allowed: Tensor, scale: float) -> Tensor:
    """``float64 [R, N]`` sampling distribution: ``softmax(scale·sim)`` restricted to ``allowed`` (uniform over
    ``allowed`` when ``sim`` is None); rows with no candidate are all zero."""
    if sim is None:
        p = allowed.double()
    else:
        logits = (sim.double() * scale).masked_fill(~allowed, float("-inf"))
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0).masked_fill(~allowed, 0.0)
    return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def sample_negatives(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw per row: the first ``j`` with ``cdf_j > u·cdf_N`` (never a zero-probability column);
    ``long [R]``, -1 for rows without mass."""
    probs = probs.double()
    cdf = probs.cumsum(-1)
    total = cdf[:, -1]
    target = (uniforms.to(probs.device).double() * total).unsqueeze(1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    cols = torch.arange(probs.shape[1], device=probs.device)
    last = torch.where(probs > 0, cols, -1).amax(-1) if probs.shape[1] else idx  # guard u·total rounding up
    idx = torch.where(idx >= probs.shape[1], last, idx)
    return torch.where(total > 0, idx, torch.full_like(idx, -1))


def _atleast_f32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def matching_loss(
    fuse: FuseFn,
    head: Callable[[Tensor], Tensor],
    tokens: Mapping[str, Tensor],
    token_mask: Mapping[str, Tensor],
    valid: Tensor,
    *,
    query: str,
    context: str,
    embeddings: Mapping[str, Tensor] | None = None,
    negatives: str = "hard",
    scale: float = 1.0 / 0.07,
    seed: int = 0,
    step: int = 0,
    groups: Tensor | None = None,
    fused_query: Tensor | None = None,
    gather: bool = True,
    summarize: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor], MatchingNegatives]:
    """ITM loss of the local rows against negatives drawn from the global batch (see the module docstring).

    Args:
        fuse: ``model.fuse``; head: ``[n, F] -> [n, 2]`` logits (index 1 = matched).
        tokens, token_mask: ``[B, T, D]`` / ``bool [B, T]`` of ``query`` and ``context`` on this rank (a missing
            mask means every token is real).
        valid: ``bool [B]``, rows with both modalities present.
        embeddings: contrastive embeddings of both modalities (``negatives="hard"`` only).
        scale: ``1/temperature`` of the hard-negative distribution.
        seed, step: seed the uniforms shared by every rank.
        groups: ``long [B]`` duplicate-group ids (equal ids are never negatives of each other; < 0: none).
        fused_query: the model's own fused query states ``[B, T_q, F]`` of the positive pairs, reused if given.
        gather: draw negatives from every rank (with gradient), else from this rank's rows only.
        summarize: ``(fused [n, T, F], query mask bool [n, T]) -> [n, F]``, the state the head reads; default
            ``fused[:, 0]``.

    Returns:
        The loss to backpropagate on this rank, detached metrics, and the negatives drawn.
    """
    rank, size = world() if gather else (0, 1)
    rows = valid.shape[0]
    device = valid.device
    q_tok, c_tok = tokens[query], tokens[context]
    q_mask = token_mask.get(query)
    c_mask = token_mask.get(context)
    q_mask = torch.ones(q_tok.shape[:2], dtype=torch.bool, device=device) if q_mask is None else q_mask.bool()
    c_mask = torch.ones(c_tok.shape[:2], dtype=torch.bool, device=device) if c_mask is None else c_mask.bool()
    if size > 1:  # every collective below runs on every rank, in the same order
        q_len, c_len = (max(col) for col in zip(*host_all_gather([q_tok.shape[1], c_tok.shape[1]]), strict=True))
        q_tok, q_mask = _pad_tokens(q_tok, q_mask, q_len)
        c_tok, c_mask = _pad_tokens(c_tok, c_mask, c_len)
        q_all, c_all = gather_with_grad(q_tok), gather_with_grad(c_tok)
        qm_all, cm_all = gather_no_grad(q_mask), gather_no_grad(c_mask)
        valid_all = gather_no_grad(valid)
        groups_all = gather_no_grad(groups) if groups is not None else None
    else:
        q_all, c_all, qm_all, cm_all, valid_all, groups_all = q_tok, c_tok, q_mask, c_mask, valid, groups
    offset = rank * rows
    global_rows = torch.arange(rows, device=device) + offset
    allowed = negative_candidates(valid, valid_all, global_rows, groups, groups_all)

    sim_qc = sim_cq = None
    if negatives == "hard":
        if embeddings is None:
            raise ObjectiveError("negatives='hard' needs the contrastive embeddings of both modalities")
        e_q = F.normalize(_atleast_f32(embeddings[query].detach()), dim=-1)
        e_c = F.normalize(_atleast_f32(embeddings[context].detach()), dim=-1)
        eq_all, ec_all = (gather_no_grad(e_q), gather_no_grad(e_c)) if size > 1 else (e_q, e_c)
        sim_qc, sim_cq = e_q @ ec_all.T, e_c @ eq_all.T
    elif negatives != "random":
        raise ObjectiveError(f"negatives must be 'hard' or 'random', got {negatives!r}")
    stream = world()[0] if not gather else 0  # local-only negatives: decorrelate the ranks' draws
    u = to_device(negative_uniforms(seed, step, rows * size, stream)[:, offset : offset + rows], device)
    neg_c = sample_negatives(negative_probs(sim_qc, allowed, scale), u[0])
    neg_q = sample_negatives(negative_probs(sim_cq, allowed, scale), u[1])

    # every row takes part in every group (fixed shapes: nothing waits for the device); a row without a positive or
    # a negative is weighted 0, and its masks are opened to all its (zero) tokens so its fused state is finite
    has_c, has_q = neg_c >= 0, neg_q >= 0
    nc, nq = neg_c.clamp_min(0), neg_q.clamp_min(0)
    weights = torch.cat([valid, has_c, has_q]).float()
    q_parts, c_parts = [q_tok, q_all[nq]], [c_all[nc], c_tok]
    qm_parts = [q_mask | ~has_c[:, None], qm_all[nq] | ~has_q[:, None]]
    cm_parts = [cm_all[nc] | ~has_c[:, None], c_mask | ~has_q[:, None]]
    if fused_query is None:  # fuse the positives here too, in the same call
        q_parts.insert(0, q_tok)
        c_parts.insert(0, c_tok)
        qm_parts.insert(0, q_mask | ~valid[:, None])
        cm_parts.insert(0, c_mask | ~valid[:, None])
    if summarize is None:
        def summarize(states: Tensor, mask: Tensor) -> Tensor:
            return states[:, 0]
    cls_parts: list[Tensor] = []
    if fused_query is not None:
        cls_parts.append(summarize(fused_query, q_mask[:, : fused_query.shape[1]]))
    fused_mask = torch.cat(qm_parts)
    fused = fuse({query: torch.cat(q_parts), context: torch.cat(c_parts)},
                 {query: fused_mask, context: torch.cat(cm_parts)}, query)
    cls_parts.append(summarize(fused, fused_mask[:, : fused.shape[1]]))
    labels = torch.cat([torch.ones(rows, dtype=torch.long, device=device),
                        torch.zeros(2 * rows, dtype=torch.long, device=device)])
    logits = head(torch.cat(cls_parts))
    ce = F.cross_entropy(_atleast_f32(logits), labels, reduction="none")
    ce_sum = torch.where(weights > 0, ce, 0.0).sum()
    n_items = weights.sum().unsqueeze(0)
    n_global = gather_no_grad(n_items).sum() if size > 1 else n_items.sum()
    loss = ce_sum * size / n_global.clamp_min(1)
    if size > 1:  # keep both gathers in this rank's graph even with no negative, so every rank's backward meets
        loss = loss + (q_all[:0].sum() + c_all[:0].sum()).to(loss.dtype)
    with torch.no_grad():
        hit = (logits.argmax(-1) == labels).float() * weights
        n_pos, n_neg = weights[:rows].sum(), weights[rows:].sum()
        metrics = {"acc": hit.sum() / n_items.sum().clamp_min(1), "acc_pos": hit[:rows].sum() / n_pos.clamp_min(1),
                   "acc_neg": hit[rows:].sum() / n_neg.clamp_min(1), "negatives_per_row": n_neg / n_pos.clamp_min(1)}
    return loss, metrics, MatchingNegatives(context=neg_c, query=neg_q)


def _pad_tokens(x: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    extra = length - x.shape[1]
    if extra <= 0:
        return x, mask
    return F.pad(x, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


@dataclass
class MatchingConfig:
    """``objectives.matching`` in a recipe."""

    weight: float = 1.0
    query: str = "text"
    context: str = "audio"
    negatives: Literal["hard", "random"] = "hard"
    temperature: float = 0.07
    exclude_duplicates: str | None = None
    gather: bool = True
    seed: int = 0


class MatchingObjective(Objective):
    """ITM / correspondence loss with a ``fusion_dim -> 2`` head (see the module docstring).

    ``last_negatives`` holds the negatives drawn by the latest forward (global row indices), for inspection."""

    def __init__(
        self,
        fusion_dim: int | None,
        *,
        query: str = "text",
        context: str = "audio",
        negatives: str = "hard",
        temperature: float = 0.07,
        exclude_duplicates: str | None = None,
        gather: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not query or not context or query == context:
            raise ObjectiveError(f"query={query!r} and context={context!r} must name two different modalities")
        if negatives not in ("hard", "random"):
            raise ObjectiveError(f"negatives must be 'hard' or 'random', got {negatives!r}")
        if not temperature > 0:
            raise ObjectiveError(f"temperature must be > 0, got {temperature}")
        if fusion_dim is not None and fusion_dim < 1:
            raise ObjectiveError(f"fusion_dim must be >= 1, got {fusion_dim}")
        self.query, self.context, self.negatives = query, context, negatives
        self.temperature, self.exclude_duplicates = temperature, exclude_duplicates
        self.gather, self.seed = gather, seed
        # without a fusion module there is nothing to size the head from; `check` then names model.family
        self.head = nn.Linear(fusion_dim, 2) if fusion_dim is not None else None
        self.requires = Requirements(modalities=(query, context), needs_fusion=True, gathers_across_ranks=gather)
        self._calls = 0
        self.last_negatives: MatchingNegatives | None = None

    @classmethod
    def from_config(cls, cfg: MatchingConfig, spec: ModelSpec | None = None) -> MatchingObjective:
        if spec is None:
            raise ObjectiveError("matching needs the model spec (its fusion_dim sizes the matching head)")
        return cls(spec.fusion_dim, query=cfg.query, context=cfg.context, negatives=cfg.negatives,
                   temperature=cfg.temperature, exclude_duplicates=cfg.exclude_duplicates, gather=cfg.gather,
                   seed=cfg.seed)

    def _groups(self, batch: Any, rows: int, device: torch.device) -> Tensor | None:
        if self.exclude_duplicates is None:
            return None
        return batch_meta_ids(batch, self.exclude_duplicates, rows, device, option="exclude_duplicates")

    def forward(self, outputs: ModelOutputs, batch: Any = None, model: Any = None) -> LossOutput:
        if self.head is None or model is None:
            raise ObjectiveError("matching needs a model with a fusion module (model.family: late_fusion, unified or "
                                 "stitched) and the "
                                 "model passed to forward")
        q, c = self.query, self.context
        valid = outputs.present[q].bool() & outputs.present[c].bool()
        index = getattr(batch, "index", None)
        step = index if isinstance(index, int) else self._calls
        self._calls += 1
        # reuse the forward's fused states only if they fused exactly this pair (no third modality as context)
        plain = {m for m in outputs.tokens if base_modality(m) == m}
        fused_query = outputs.fused.get(q) if plain == {q, c} else None
        (q_states, q_mask), (c_states, c_mask) = fusion_view(outputs, q), fusion_view(outputs, c)
        loss, metrics, negs = matching_loss(
            model.fuse, self.head, {q: q_states, c: c_states}, {q: q_mask, c: c_mask}, valid, query=q, context=c,
            embeddings=outputs.embeddings if self.negatives == "hard" else None, negatives=self.negatives,
            scale=1.0 / self.temperature, seed=self.seed, step=step,
            groups=self._groups(batch, valid.shape[0], valid.device), fused_query=fused_query, gather=self.gather,
            summarize=lambda states, mask: fused_summary(model, states, mask),
        )
        self.last_negatives = MatchingNegatives(context=negs.context.detach(), query=negs.query.detach())
        return LossOutput(loss=loss, terms={"itm": loss.detach()}, metrics=metrics)

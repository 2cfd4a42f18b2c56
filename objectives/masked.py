"""Masked prediction: MLM, cross-modal MLM, MAE and masked cluster prediction.

Masks and targets are the model's (`objectives.base.MultimodalModel`): ``model.mask(m, x, ratio, generators,
kind=...)`` draws the modality plug-in's mask of the recipe's kind (``mask``; the kinds a modality offers are
``spec.mask_kinds[m]``: image random / block, audio random / span / block, video tube, sequence random / span, text
BERT's selection) from the host copy of the batch, one generator per sample seeded from ``(seed, batch index,
key)``; ``model.target(m, x)`` gives the per-token target ``[B, T, P]`` (patches, tubelets, sequence patches);
``model.encode_masked(m, x, mask, ...)`` the tower's masked view (replace mode with a mask token, drop mode with the
visible count read off the host mask). So the plug-ins' masks are the ones training uses, and "how many of ``n``
tokens a ratio masks" is the model's one formula, ``⌊ratio·n + ½⌋`` (`architectures.modalities.masking`).
In every loss the mean runs over the selected (masked) tokens of rows whose modality is present, counted over all
ranks (`objectives.masking.global_mean`).

* ``mlm`` (BERT, Devlin et al. 2019): the model's text mask selects ``max(1, ⌊ratio·n + ½⌋)`` of each row's ``n``
  real, non-special tokens, replaced 80/10/10 (`bert_mask`); the text tower re-run on them through
  ``model({m: masked}, present)``, ``h`` its token states; with the head ``g(h) = W_o LN(GELU(W_d h + b_d)) + b_o``
  (BERT's transform + decoder)::

      L = 1/|M| Σ_{(b,t) ∈ M} -log softmax(g(h_{b,t}))[x_{b,t}]          M: selected positions

* ``masked_cross`` (ALBEF, Li et al. 2021; FLAVA MMM, Singh et al. 2022): the same, with ``h`` the fusion states
  ``model.fuse({text: masked-text tokens, context: outputs.tokens[context]}, masks, query=text)``, rows with both
  modalities present.
* ``mae`` (He et al. 2022; VideoMAE, Tong et al. 2022, with ``mask: tube``): a ``mask_ratio`` of the tokens is
  masked (``random``: uniformly; ``tube``: the same spatial patches in every frame group) and dropped, the tower
  encodes only the visible ones; a small decoder owned by the objective (linear in, the learned mask token at masked
  positions, positional embedding — fixed sin-cos over the token grid, `sincos_positions`, or learned — pre-norm
  blocks, linear to the target width ``P``) predicts every token. The tower's prefix tokens (class / register
  tokens, a video tower's frame states) are kept through the decoder, with no positional embedding (as MAE's zero
  class-token position), and dropped at its output. With ``p`` the token's target (patch pixels in MAE order,
  tubelet pixels, sequence values)::

      t = (p - mean(p)) / sqrt(var(p) + 1e-6)   (norm_pix_loss; var unbiased, as MAE's torch ``var``; else t = p)
      L = 1/|M| Σ_{(b,n) ∈ M} mean_d (ŷ_{b,n,d} - t_{b,n,d})²

* ``masked_cluster`` (HuBERT, Hsu et al. 2021; AV-HuBERT, Shi et al. 2022): masked token embeddings are replaced by
  a learned mask token (tower replace mode; ``mask: span`` by default where the modality offers it: whole time
  columns of a spectrogram, wav2vec 2.0 spans of a sequence's patches); the target of token ``p`` is
  ``z = argmin_k ||p - c_k||²`` (computed in float64) over a codebook buffer ``c`` (``K x P``) fitted by seeded
  k-means (`objectives.kmeans`) on the first global batch's raw targets (HuBERT's first iteration clusters MFCCs;
  here the un-normalised spectrogram patches, tubelets or sequence patches; a padded sequence's real tokens only,
  the ones the model's mask at ratio 1 covers), gathered from every rank, fitted on rank 0 and broadcast; saved in
  the state dict; re-fitted, warm-started, on the batch after each ``refresh``. With ``W`` a linear map to ``K``::

      L = 1/|M| Σ_{(b,n) ∈ M} -log softmax(W h_{b,n})[z_{b,n}]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.objectives.base import (
    BlockFactory,
    LossOutput,
    ModelOutputs,
    ModelSpec,
    MultimodalModel,
    Objective,
    ObjectiveError,
    Requirements,
    decoder_blocks,
    fusion_view,
    subset_presence,
)
from mmssl.objectives.distributed import gather_rows, world
from mmssl.objectives.ids import to_device
from mmssl.objectives.kmeans import kmeans
from mmssl.objectives.masking import (
    TokenMask,
    bert_mask,
    cluster_targets,
    global_mean,
    host_input,
    host_row_counts,
    presence,
    row_generators,
    selected_slots,
    sincos_positions,
    upcast,
)


def token_ce(logits: Tensor, targets: Tensor, *, weights: Tensor | None = None,
             global_norm: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy summed over the ``[n, V]`` logits of the tokens ``weights`` (``bool[n]``, default all) keeps,
    divided by the (global) count of kept tokens. Masked, not indexed: the shapes do not depend on the data."""
    logits = upcast(logits)
    keep = torch.ones_like(targets, dtype=torch.bool) if weights is None else weights.bool()
    nll = torch.where(keep, F.cross_entropy(logits, targets, reduction="none"), 0.0).sum()
    count = keep.sum().float()
    with torch.no_grad():
        acc = ((logits.argmax(-1) == targets) & keep).sum() / count.clamp_min(1)
    return global_mean(nll, count, global_norm), {"acc": acc, "tokens": count.detach()}


def mlm_loss(logits: Tensor, targets: Tensor, selected: Tensor, *, global_norm: bool = True) -> Tensor:
    """``[B, L, V]`` logits, ``[B, L]`` original ids, ``bool[B, L]`` selected: the MLM loss of the docstring."""
    return token_ce(logits.flatten(0, 1), targets.flatten(), weights=selected.flatten(), global_norm=global_norm)[0]


def norm_pix_target(patches: Tensor, eps: float = 1e-6) -> Tensor:
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def mae_loss(pred: Tensor, patches: Tensor, mask: Tensor, *, norm_pix: bool = True,
             global_norm: bool = True) -> Tensor:
    """``pred``/``patches`` ``[B, N, P]``, ``mask`` ``bool[B, N]`` (masked patches of present rows)."""
    pred = upcast(pred)
    target = norm_pix_target(patches.to(pred.dtype)) if norm_pix else patches.to(pred.dtype)
    per_patch = (pred - target).square().mean(dim=-1)
    return global_mean((per_patch * mask).sum(), mask.sum(), global_norm)


def _gens(seed: int, batch: Any, rows: int) -> list[torch.Generator]:
    keys = list(getattr(batch, "keys", None) or [str(i) for i in range(rows)])
    return row_generators(seed, keys, int(getattr(batch, "index", 0)))


def _leaf(x: Any) -> Tensor:
    """A tensor of a modality's input (a tensor, or a dict of them such as a sequence's values and mask)."""
    return next(iter(x.values())) if isinstance(x, dict) else x


def _rows(x: Any) -> int:
    return int(_leaf(x).shape[0])


def _device(x: Any) -> torch.device:
    return _leaf(x).device


class MLMHead(nn.Module):
    """BERT's prediction head: dense, GELU, LayerNorm, linear to the vocabulary."""

    def __init__(self, width: int, vocab_size: int) -> None:
        super().__init__()
        self.dense, self.norm = nn.Linear(width, width), nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab_size)

    def forward(self, h: Tensor) -> Tensor:
        return self.out(self.norm(F.gelu(self.dense(h))))


@dataclass
class MLMConfig:
    """``objectives.mlm`` (``masked_cross`` adds ``context``)."""

    weight: float = 1.0
    modality: str = "text"
    mask_ratio: float = 0.15
    replace_prob: float = 0.8
    random_prob: float = 0.1
    seed: int = 0
    global_norm: bool = True
    tie_embeddings: bool = False  # the decoder's weight is the text tower's input embedding table (BERT, ALBEF)


@dataclass
class CrossMLMConfig(MLMConfig):
    context: str = "audio"


class MLMObjective(Objective):
    """``mlm``; given a `CrossMLMConfig`, ``masked_cross`` (predicts from the fusion states)."""

    def __init__(self, cfg: MLMConfig, spec: ModelSpec) -> None:
        super().__init__()
        m = cfg.modality
        if m not in spec.vocab_sizes:
            raise ObjectiveError(f"modality={m!r} is not a token-id modality (have: {sorted(spec.vocab_sizes)})")
        specials = spec.special_tokens.get(m, {})
        if "mask" not in specials:
            raise ObjectiveError(f"the {m!r} tokenizer has no mask token (special ids: {specials}); "
                                 "use a sentencepiece model built by mmssl (it has <mask>) or a [MASK] vocabulary")
        mask_kind(spec, m, None, "mlm")  # the model selects the tokens: its text plug-in must mask
        if not 0 < cfg.mask_ratio < 1:
            raise ObjectiveError(f"mask_ratio must be in (0, 1), got {cfg.mask_ratio}")
        if cfg.replace_prob < 0 or cfg.random_prob < 0 or cfg.replace_prob + cfg.random_prob > 1:
            raise ObjectiveError(f"replace_prob={cfg.replace_prob} and random_prob={cfg.random_prob} must be >= 0 "
                                 "with a sum <= 1")
        self.cfg = cfg
        self.cross = isinstance(cfg, CrossMLMConfig)
        self.vocab_size = spec.vocab_sizes[m]
        self.specials = specials
        if self.cross:
            ctx = cfg.context  # type: ignore[attr-defined]
            if ctx not in spec.token_dims or ctx == m:
                raise ObjectiveError(f"context={ctx!r} must name another tower (towers: {sorted(spec.token_dims)})")
            if spec.fusion_dim is None:
                raise ObjectiveError(f"masked_cross needs a fusion module; model.family={spec.family!r} has none "
                                     "(use model.family: late_fusion)")
            self.head = MLMHead(spec.fusion_dim, self.vocab_size)
            mods: tuple[str, ...] = (m, ctx)
        else:
            self.head = MLMHead(spec.token_dims[m], self.vocab_size)
            mods = (m,)
        self.requires = Requirements(modalities=mods, needs_fusion=self.cross, needs_masked_view=(m,),
                                     gathers_across_ranks=cfg.global_norm)
        if cfg.tie_embeddings:
            self.max_zero_stage = 2  # one tensor owned by two modules: ZeRO-3 would partition it twice

    def bind(self, model: nn.Module) -> None:
        """With ``tie_embeddings``, share the decoder's weight with the text tower's input embeddings (Devlin et
        al. 2019; ALBEF ties its MLM head the same way): one tensor, trained by both uses."""
        if not self.cfg.tie_embeddings:
            return
        get = getattr(model, "input_embeddings", None)
        table = get(self.cfg.modality) if get is not None else None
        if table is None:
            raise ObjectiveError(f"tie_embeddings: the {self.cfg.modality!r} tower has no input embedding table")
        if tuple(table.weight.shape) != tuple(self.head.out.weight.shape):
            raise ObjectiveError(f"tie_embeddings: the embedding table {list(table.weight.shape)} does not match the "
                                 f"decoder {list(self.head.out.weight.shape)} (the fusion / tower width must equal "
                                 f"model.{self.cfg.modality}.width)")
        self.head.out.weight = table.weight

    @classmethod
    def from_config(cls, cfg: MLMConfig, spec: ModelSpec | None = None) -> MLMObjective:
        if spec is None:
            raise ObjectiveError("masked language modelling needs the model spec (vocabulary, special ids)")
        return cls(cfg, spec)

    def make_mask(self, batch: Any, model: MultimodalModel) -> TokenMask:
        """The `TokenMask` this objective draws for ``batch`` (deterministic per sample key and batch index): the
        model's text mask (BERT's selection), drawn from the host batch, then BERT's 80/10/10 replacement."""
        return self._draw(batch, model)[0]

    def _draw(self, batch: Any, model: MultimodalModel) -> tuple[TokenMask, int]:
        """`make_mask` and the most tokens a row selects (read off the host selection)."""
        m = self.cfg.modality
        h = host_input(batch, m)
        gens = _gens(self.cfg.seed, batch, h["input_ids"].shape[0])
        selected = model.mask(m, h, self.cfg.mask_ratio, gens)
        tm = bert_mask(h["input_ids"], selected, special_ids=self.specials.values(), mask_id=self.specials["mask"],
                       vocab_size=self.vocab_size, generator=gens, replace_prob=self.cfg.replace_prob,
                       random_prob=self.cfg.random_prob, device=batch.inputs[m]["input_ids"].device)
        return tm, host_row_counts(selected)[1]

    def forward(self, outputs: ModelOutputs, batch: Any = None, model: Any = None) -> LossOutput:
        if batch is None or model is None:
            raise ObjectiveError("masked language modelling needs the batch and the model")
        m = self.cfg.modality
        x = batch.inputs[m]
        tm, slots = self._draw(batch, model)
        valid = presence(outputs, batch, m, x["input_ids"].shape[0], x["input_ids"].device)
        masked_inputs = {"input_ids": tm.input_ids, "attention_mask": x["attention_mask"]}
        given = subset_presence(batch.present, [m]) if m in batch.present else {m: valid}  # keeps host-side counts
        masked_out = model({m: masked_inputs}, given)
        states = masked_out.tokens[m]
        if self.cross:
            ctx = self.cfg.context  # type: ignore[attr-defined]
            valid = valid & presence(outputs, batch, ctx, valid.shape[0], valid.device)
            (q_states, q_mask), (c_states, c_mask) = fusion_view(masked_out, m), fusion_view(outputs, ctx)
            states = model.fuse({m: q_states, ctx: c_states}, {m: q_mask, ctx: c_mask}, query=m)
        sel = tm.selected & valid[:, None]
        index, used = selected_slots(sel, max(1, slots))
        picked = states.gather(1, index.unsqueeze(-1).expand(-1, -1, states.shape[-1]))
        loss, metrics = token_ce(self.head(picked).flatten(0, 1), x["input_ids"].gather(1, index).flatten(),
                                 weights=used.flatten(), global_norm=self.cfg.global_norm)
        return LossOutput(loss=loss, terms={"nll": loss.detach()}, metrics=metrics)


class CrossModalMLMObjective(MLMObjective):
    """``masked_cross``: MLM through the fusion module (ALBEF / FLAVA MMM)."""

    @classmethod
    def from_config(cls, cfg: MLMConfig, spec: ModelSpec | None = None) -> MLMObjective:
        if not isinstance(cfg, CrossMLMConfig):
            raise ObjectiveError(f"masked_cross takes a CrossMLMConfig, got {type(cfg).__name__}")
        return super().from_config(cfg, spec)


def unshuffle(visible: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
    """MAE's unshuffle: ``visible`` ``[B, V, w]`` (each row's unmasked tokens in grid order, as a tower's drop mode
    gives them) and the mask token at every masked position of ``mask`` (``bool[B, N]``), gathered back to grid
    order ``[B, N, w]`` (no host sync). A row with fewer than ``V`` unmasked tokens (a padded sequence) has filler
    in its last slots; they land on masked positions, which take the mask token."""
    b, n = mask.shape
    w = visible.shape[-1]
    token = mask_token.to(visible.dtype)
    order = torch.argsort(mask.int(), dim=1, stable=True)
    seq = torch.cat([visible, token.expand(b, n - visible.shape[1], w)], dim=1)
    full = torch.gather(seq, 1, torch.argsort(order, dim=1)[..., None].expand(-1, -1, w))
    return torch.where(mask.unsqueeze(-1), token, full)


class MAEDecoder(nn.Module):
    def __init__(self, in_dim: int, patch_dim: int, *, block: BlockFactory, width: int, depth: int, heads: int,
                 mlp_ratio: float, grid: tuple[int, ...] | None) -> None:
        super().__init__()
        self.width = width
        self.embed = nn.Linear(in_dim, width)
        self.mask_token = nn.Parameter(torch.randn(width) * 0.02)
        self.grid = grid
        self.pos = nn.Parameter(torch.randn(math.prod(grid), width) * 0.02) if grid else None
        self.blocks = decoder_blocks(block, depth, width, heads, mlp_ratio)  # the model's block (spec.block)
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, patch_dim)

    def forward(self, features: Tensor, mask: Tensor, grid: tuple[int, ...], visible: int) -> Tensor:
        """``features`` ``[B, prefix + visible, D]`` (the drop mode's slots: each row's unmasked tokens in grid
        order), ``mask`` ``bool[B, N]`` over the ``N = prod(grid)`` tokens: predictions ``[B, N, patch_dim]`` for
        every token."""
        h = self.embed(features)
        prefix = h.shape[1] - visible
        full = unshuffle(h[:, prefix:], mask, self.mask_token)
        if self.pos is not None:
            if tuple(grid) != tuple(self.grid):
                raise ObjectiveError(f"the token grid {list(grid)} differs from the configured grid={list(self.grid)}")
            pos = self.pos
        else:
            pos = sincos_positions(tuple(grid), self.width).to(h.device)
        x = torch.cat([h[:, :prefix], full + pos.to(h.dtype)], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, prefix:]


# Mask kinds that hide a fixed share of each row's tokens: what dropping the masked tokens (MAE, joint MAE) needs.
DROP_KINDS = ("random", "tube")


def mask_kind(spec: ModelSpec, modality: str, kind: str | None, objective: str,
              usable: tuple[str, ...] | None = None, prefer: tuple[str, ...] = ()) -> str:
    """The mask kind ``objective`` draws for ``modality``: ``kind`` (the recipe's ``mask``) checked against the
    kinds the modality offers (``spec.mask_kinds``), of which ``objective`` takes ``usable`` (default all); for
    None the first offered of ``prefer``, else of the usable ones."""
    offered = tuple(spec.mask_kinds.get(modality, ()))
    takes = [k for k in offered if usable is None or k in usable]
    if kind is None:
        kind = next((k for k in (*prefer, *takes) if k in takes), None)
        if kind is None:
            raise ObjectiveError(f"mask: modality {modality!r} offers mask kinds {list(offered)}, none of which "
                                 f"{objective} takes ({list(usable or ())})")
    if kind not in takes:
        why = "" if kind not in offered else f" ({objective} drops the masked tokens and takes {list(usable or ())})"
        raise ObjectiveError(f"mask={kind!r} is not a mask kind {objective} can draw for modality {modality!r}: it "
                             f"offers {list(offered)}{why}")
    return kind


class _MaskedViewObjective(Objective):
    """Shared set-up of the objectives that encode a masked view of one modality (``mae``, ``masked_cluster``)."""

    target_dim: int  # P: the model's per-token target width
    grid: tuple[int, ...]  # the token grid of the masked view

    def _setup(self, modality: str, spec: ModelSpec, kind: str) -> None:
        if modality not in spec.mask_targets:
            raise ObjectiveError(
                f"modality={modality!r} has no tower that encodes a masked view; {kind} needs one (maskable: "
                f"{sorted(spec.mask_targets)}: a ViT image or audio tower, e.g. model.{modality}.arch: "
                "vit_tiny_patch16_224, a video tower over ViT frames, or a sequence tower)")
        self.target_dim, self.grid = int(spec.mask_targets[modality]), tuple(spec.mask_grids[modality])

    def _check_tokens(self, mask: Tensor, modality: str) -> None:
        if mask.shape[1] != math.prod(self.grid):
            raise ObjectiveError(f"the model's {modality!r} mask covers {mask.shape[1]} tokens, not the "
                                 f"{math.prod(self.grid)} of its token grid {list(self.grid)}")


@dataclass
class MAEConfig:
    """``objectives.mae``."""

    weight: float = 1.0
    modality: str = "audio"
    mask: str | None = None  # random (MAE) or tube (VideoMAE); default: the modality's
    mask_ratio: float = 0.75
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    mlp_ratio: float = 4.0
    pos_embed: str = "sincos"  # or "learned" (needs grid)
    grid: list[int] = field(default_factory=list)  # the token grid ([rows, cols] of patches, ...): learned positions
    norm_pix_loss: bool = True
    seed: int = 0
    global_norm: bool = True


class MAEObjective(_MaskedViewObjective):
    def __init__(self, cfg: MAEConfig, spec: ModelSpec) -> None:
        super().__init__()
        self._setup(cfg.modality, spec, "mae")
        self.kind = mask_kind(spec, cfg.modality, cfg.mask, "mae", DROP_KINDS)
        if not 0 < cfg.mask_ratio < 1:
            raise ObjectiveError(f"mask_ratio must be in (0, 1), got {cfg.mask_ratio}")
        if cfg.pos_embed not in ("sincos", "learned"):
            raise ObjectiveError(f"pos_embed must be 'sincos' or 'learned', got {cfg.pos_embed!r}")
        if cfg.pos_embed == "sincos" and cfg.decoder_width % 4:
            raise ObjectiveError(f"decoder_width={cfg.decoder_width} must be divisible by 4 for sin-cos positions")
        if cfg.pos_embed == "learned" and tuple(cfg.grid) != self.grid:
            raise ObjectiveError(f"pos_embed='learned' needs grid: the token grid of {cfg.modality!r}, "
                                 f"{list(self.grid)}; got {cfg.grid}")
        self.cfg = cfg
        self.decoder = MAEDecoder(spec.token_dims[cfg.modality], self.target_dim, block=spec.block,
                                  width=cfg.decoder_width, depth=cfg.decoder_depth, heads=cfg.decoder_heads,
                                  mlp_ratio=cfg.mlp_ratio, grid=self.grid if cfg.pos_embed == "learned" else None)
        self.requires = Requirements(modalities=(cfg.modality,), needs_masked_view=(cfg.modality,),
                                     needs_decoder=True, gathers_across_ranks=cfg.global_norm)

    @classmethod
    def from_config(cls, cfg: MAEConfig, spec: ModelSpec | None = None) -> MAEObjective:
        if spec is None:
            raise ObjectiveError("mae needs the model spec (masked views, token width)")
        return cls(cfg, spec)

    def no_weight_decay(self) -> set[str]:
        return {"decoder.mask_token", "decoder.pos"}

    def make_mask(self, batch: Any, model: MultimodalModel) -> Tensor:
        """The model's mask of ``mask`` kind for ``batch``, drawn on the host (per sample key and batch index)."""
        m = self.cfg.modality
        x = host_input(batch, m)
        return model.mask(m, x, self.cfg.mask_ratio, _gens(self.cfg.seed, batch, _rows(x)), kind=self.kind)

    def forward(self, outputs: ModelOutputs, batch: Any = None, model: Any = None) -> LossOutput:
        if batch is None or model is None:
            raise ObjectiveError("mae needs the batch and the model")
        m = self.cfg.modality
        x = batch.inputs[m]
        drawn = self.make_mask(batch, model)
        self._check_tokens(drawn, m)
        visible = drawn.shape[1] - host_row_counts(drawn)[0]  # slots for the row that keeps the most
        mask = to_device(drawn, _device(x))
        pred = self.decoder(model.encode_masked(m, x, mask, visible=visible), mask, self.grid, visible)
        sel = mask & presence(outputs, batch, m, mask.shape[0], mask.device)[:, None]
        loss = mae_loss(pred, model.target(m, x), sel, norm_pix=self.cfg.norm_pix_loss,
                        global_norm=self.cfg.global_norm)
        return LossOutput(loss=loss, terms={"mse": loss.detach()},
                          metrics={"visible": torch.full((), float(visible), device=loss.device)})


@dataclass
class MaskedClusterConfig:
    """``objectives.masked_cluster``."""

    weight: float = 1.0
    modality: str = "audio"
    num_clusters: int = 100
    mask: str | None = None  # span (time spans), random, block or tube, as the modality offers; default: span if
    #                          offered, else the modality's first kind
    mask_ratio: float = 0.5  # random / block / tube
    span_start_prob: float = 0.25  # span: the share of time steps (columns, patches) that start a span
    span_length: int = 2  # span: steps per span
    kmeans_iters: int = 20
    refresh_every: int = 0  # steps between codebook re-fits (0: fit once, on the first batch)
    seed: int = 0
    global_norm: bool = True


class MaskedClusterObjective(_MaskedViewObjective):
    def __init__(self, cfg: MaskedClusterConfig, spec: ModelSpec) -> None:
        super().__init__()
        self._setup(cfg.modality, spec, "masked_cluster")
        self.kind = mask_kind(spec, cfg.modality, cfg.mask, "masked_cluster", prefer=("span",))
        self.full_kind = mask_kind(spec, cfg.modality, None, "masked_cluster", DROP_KINDS)  # at ratio 1: all maskable
        if cfg.num_clusters < 2:
            raise ObjectiveError(f"num_clusters must be >= 2, got {cfg.num_clusters}")
        if not 0 < cfg.mask_ratio < 1:
            raise ObjectiveError(f"mask_ratio must be in (0, 1), got {cfg.mask_ratio}")
        if cfg.span_length < 1 or not 0 < cfg.span_start_prob <= 1:
            raise ObjectiveError(f"span_length={cfg.span_length} must be >= 1 and span_start_prob="
                                 f"{cfg.span_start_prob} in (0, 1]")
        self.cfg = cfg
        self.refresh_every = cfg.refresh_every
        width = spec.token_dims[cfg.modality]
        self.mask_token = nn.Parameter(torch.randn(width) * 0.02)
        self.head = nn.Linear(width, cfg.num_clusters)
        self.register_buffer("codebook", torch.zeros(cfg.num_clusters, self.target_dim))
        self.register_buffer("codebook_fits", torch.zeros(1, dtype=torch.long))  # [1]: DeepSpeed broadcasts it
        self._refit = False
        self._fitted: bool | None = None  # mirrors codebook_fits > 0 without a device sync every step
        self.requires = Requirements(modalities=(cfg.modality,), needs_masked_view=(cfg.modality,),
                                     gathers_across_ranks=True)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._fitted = None

    @classmethod
    def from_config(cls, cfg: MaskedClusterConfig, spec: ModelSpec | None = None) -> MaskedClusterObjective:
        if spec is None:
            raise ObjectiveError("masked_cluster needs the model spec (masked views, token width)")
        return cls(cfg, spec)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    @torch.no_grad()
    def fit_codebook(self, patches: Tensor) -> None:
        """k-means over ``[n, P]`` raw targets gathered from every rank in rank order (so 1 rank and W ranks fit
        the same codebook on the same global batch; warm-started from the codebook after the first fit), computed
        on rank 0 and broadcast. Every rank must call it."""
        rank, size = world()
        patches = gather_rows(patches.float())
        k = self.cfg.num_clusters
        if patches.shape[0] < k:  # on every rank, before the broadcast
            raise ObjectiveError(f"num_clusters={k} is more than the {patches.shape[0]} patches k-means sees")
        if rank == 0:
            init = self.codebook.float() if int(self.codebook_fits[0]) > 0 else None
            centroids, _, _ = kmeans(patches, k, self.cfg.kmeans_iters, self.cfg.seed, init=init)
            self.codebook.copy_(centroids)
        if size > 1:
            dist.broadcast(self.codebook, 0)
        self.codebook_fits += 1
        self._fitted = True

    def refresh(self, step: int, features: Any) -> dict[str, float]:
        self._refit = True  # the raw patches are not in the feature pass: re-fit on the next training batch
        return {"codebook_fits": float(self.codebook_fits[0])}

    def make_mask(self, batch: Any, model: MultimodalModel) -> Tensor:
        """The model's mask of ``mask`` kind for ``batch``, drawn on the host (per sample key and batch index)."""
        m = self.cfg.modality
        x = host_input(batch, m)
        gens = _gens(self.cfg.seed, batch, _rows(x))
        if self.kind == "span":
            return model.mask(m, x, self.cfg.span_start_prob, gens, kind="span", span_length=self.cfg.span_length)
        return model.mask(m, x, self.cfg.mask_ratio, gens, kind=self.kind)

    def forward(self, outputs: ModelOutputs, batch: Any = None, model: Any = None) -> LossOutput:
        if batch is None or model is None:
            raise ObjectiveError("masked_cluster needs the batch and the model")
        m = self.cfg.modality
        x = batch.inputs[m]
        target = model.target(m, x).float()
        valid = presence(outputs, batch, m, target.shape[0], target.device)
        if self._fitted is None:
            self._fitted = int(self.codebook_fits[0]) > 0
        if not self._fitted or self._refit:
            # the tokens a full mask covers: every token, or a padded sequence's real ones (padding is never a target)
            maskable = model.mask(m, host_input(batch, m), 1.0, torch.Generator(), kind=self.full_kind)
            self.fit_codebook(target[to_device(maskable, target.device) & valid[:, None]])
            self._refit = False
        targets = cluster_targets(target, self.codebook)
        drawn = self.make_mask(batch, model)
        self._check_tokens(drawn, m)
        mask = to_device(drawn, target.device)
        features = model.encode_masked(m, x, mask, mask_token=self.mask_token)
        states = features[:, features.shape[1] - mask.shape[1]:]
        sel = mask & valid[:, None]
        loss, metrics = token_ce(self.head(states).flatten(0, 1), targets.flatten(), weights=sel.flatten(),
                                 global_norm=self.cfg.global_norm)
        metrics["masked_fraction"] = mask.float().mean()
        return LossOutput(loss=loss, terms={"nll": loss.detach()}, metrics=metrics)

"""Clustering objectives: offline pseudo-labels (DeepCluster family) and online balanced codes (SwAV / SeLaVi).

**DeepCluster** (Caron et al. 2018) and its cross-modal variants from XDC (Alwassel et al. 2020). Every
``refresh_every`` steps, ``refresh`` runs k-means (`objectives.kmeans`, K = ``num_clusters``) on features of a
sample of the stream (``samples_per_refresh`` samples over all ranks) and stores ``key -> cluster id`` per
clustering; between refreshes a linear head ``h_{m→c}`` per (input modality m, clustering c) is trained with::

    L = mean_{(m,c) ∈ heads} [ 1/N_{m,c} Σ_{i labelled} -log softmax(W_{m→c} f_m(x_i) + b_{m→c})[y_c(i)] ]

where ``f_m`` is the ``pooled`` or ``embeddings`` feature of m, ``y_c(i)`` the label of sample i's key in
clustering c, and ``N_{m,c}`` the number of rows over the *global* batch with m present and a label (each rank
returns ``W/N · Σ_local``, so the mean over ranks is L). Variants (heads as (input → clustering))::

    deepcluster: m → m for each modality (independent DeepCluster per modality)
    xdc:         a → b and b → a (each modality predicts the OTHER modality's clusters; exactly 2 modalities)
    mdc:         m → c for every pair (multi-head: each modality predicts its own and the others' clusters)
    cdc:         m → joint (one clustering of the concatenated features [f_a/|f_a|, f_b/|f_b|] of rows with
                 every modality present; each modality predicts it)

After every refresh the heads are re-initialised (W ~ N(0, 0.01²), b = 0, as DeepCluster does: cluster ids
permute between clusterings), in place, including DeepSpeed's fp32 master copy where the engine keeps one (ZeRO-1/2
``_hp_mapping``; ZeRO-3 through ``GatheredParameters``); the optimizer's moments for the heads carry over.
Before the first refresh (the trainer refreshes at step 0, so only if that refresh was skipped), and for batches
without labelled rows, the loss is ``0 · Σ logits``: zero, but connected to every head parameter.
Labels and the refresh step are saved in ``state_dict()`` (``get_extra_state``), so a resumed run keeps them.

**SwAV swapped prediction** (Caron et al. 2020; SeLaVi, Asano et al. 2020 for audio-visual): with learnable
prototypes ``C ∈ R^{K×E}`` (L2-normalised in the forward), ``z = normalise(embedding)``, scores ``s = z Cᵀ``, codes
``q = sinkhorn(s.detach(), ε, n_iters)`` balanced over the global batch (`objectives.sinkhorn`) and
``p = softmax(s/τ)``::

    L = 1/N Σ_i -1/2 [ Σ_k q_b[i,k] log p_a[i,k] + Σ_k q_a[i,k] log p_b[i,k] ]

over rows with both modalities (views) present, N counted over all ranks. No offline pass is needed. For the first
``freeze_prototypes_steps`` optimizer steps the prototypes receive a zero gradient (SwAV freezes them early on).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.objectives.base import (
    FeatureSource,
    LossOutput,
    ModelOutputs,
    ModelSpec,
    Objective,
    ObjectiveError,
    Requirements,
    base_modality,
)
from mmssl.objectives.distributed import gather_keyed_rows, sum_over_ranks, world
from mmssl.objectives.kmeans import kmeans, normalized_mutual_info
from mmssl.objectives.sinkhorn import swav_loss

VARIANTS = ("deepcluster", "xdc", "mdc", "cdc")
FEATURES = ("pooled", "embeddings")
JOINT = "joint"


def pseudo_label_loss(logits: Tensor, labels: Tensor, *, gather: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy of ``logits [B, K]`` against ``labels [B]`` (``-1``: no label, skipped), as
    ``W/N_global · Σ_{local labelled rows}`` (the mean over ranks is the global-batch mean). With no labelled row
    anywhere the loss is ``0 · Σ logits`` (zero, still in the graph). Every rank must call it when ``gather``."""
    rank_size = world()[1] if gather else 1
    keep = labels >= 0
    n_global = sum_over_ranks(keep.sum().float(), gather)
    if float(n_global) == 0:
        loss = logits.sum() * 0.0
    else:
        rows = logits[keep] if logits.dtype == torch.float64 else logits[keep].float()
        ce = F.cross_entropy(rows, labels[keep], reduction="sum")
        loss = ce * rank_size / n_global + logits.sum() * 0.0
    with torch.no_grad():
        acc = (logits[keep].argmax(-1) == labels[keep]).float().mean() if keep.any() else logits.new_zeros(())
    return loss, {"acc": acc, "labelled": keep.float().mean() if keep.numel() else logits.new_zeros(())}


def modality_rows(outputs: ModelOutputs, field_name: str, modality: str, rows: int, width: int,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """``(present bool[rows], features [rows, width])`` of one modality; a modality the batch lacks entirely
    (models leave it out of their outputs) gives all-absent zero rows, so every rank still makes the same calls."""
    feats = getattr(outputs, field_name)
    if modality not in feats:
        return torch.zeros(rows, dtype=torch.bool, device=device), torch.zeros(rows, width, device=device)
    return outputs.present[modality].bool(), feats[modality]


def _reinit_(param: nn.Parameter, value: Tensor) -> None:
    """Write ``value`` into ``param`` in place, and into DeepSpeed's fp32 master copy where the engine keeps one
    (ZeRO-1/2 and bf16 ``_hp_mapping``; ZeRO-3 partitions), so the optimizer's next step does not write the old
    weights back. Adam moments are left as they are: DeepSpeed 0.19 links them for the second param group only
    after a resume, so resetting them would make a resumed run differ from an uninterrupted one."""
    with torch.no_grad():
        if hasattr(param, "ds_id"):  # ZeRO-3: the local tensor is a partition; gather, write, re-partition
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(value)
        else:
            param.data.copy_(value)
    if hasattr(param, "ds_id") or getattr(param, "_hp_mapping", None) is not None:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.float())


@dataclass
class ClusteringConfig:
    """``objectives.clustering`` in a recipe."""

    weight: float = 1.0
    variant: str = "deepcluster"
    modalities: list[str] = field(default_factory=list)
    num_clusters: int = 64
    refresh_every: int = 100
    samples_per_refresh: int = 2048
    kmeans_iters: int = 20
    feature: str = "embeddings"
    spherical: bool = True
    reset_heads: bool = True
    seed: int = 0


class ClusteringObjective(Objective):
    """DeepCluster / XDC / MDC / CDC pseudo-label classification (see the module docstring).

    ZeRO 0-2 only: the feature pass stops at each rank's quota, so ranks may run different numbers of forwards,
    which ZeRO-3's parameter gathers would turn into a hang."""

    max_zero_stage = 2

    def __init__(self, variant: str, modalities: Sequence[str], in_dims: dict[str, int], *, num_clusters: int = 64,
                 refresh_every: int = 100, samples_per_refresh: int = 2048, kmeans_iters: int = 20,
                 feature: str = "embeddings", spherical: bool = True, reset_heads: bool = True, seed: int = 0,
                 gather: bool = True) -> None:
        super().__init__()
        mods = list(modalities)
        if variant not in VARIANTS:
            raise ObjectiveError(f"unknown clustering variant {variant!r}; known: {list(VARIANTS)}")
        if not mods or len(set(mods)) != len(mods):
            raise ObjectiveError(f"clustering `modalities` must name one or more distinct modalities, got {mods}")
        if variant == "xdc" and len(mods) != 2:
            raise ObjectiveError(f"variant 'xdc' needs exactly 2 modalities, got {mods}")
        if variant in ("mdc", "cdc") and len(mods) < 2:
            raise ObjectiveError(f"variant {variant!r} needs at least 2 modalities, got {mods}")
        if feature not in FEATURES:
            raise ObjectiveError(f"clustering `feature` must be one of {list(FEATURES)}, got {feature!r}")
        if num_clusters < 2:
            raise ObjectiveError(f"num_clusters must be >= 2, got {num_clusters}")
        if num_clusters > samples_per_refresh:
            raise ObjectiveError(f"num_clusters={num_clusters} exceeds samples_per_refresh={samples_per_refresh}: "
                                 "k-means needs at least one sample per cluster")
        if refresh_every < 1 or kmeans_iters < 1:
            raise ObjectiveError(f"refresh_every and kmeans_iters must be >= 1, got {refresh_every}, {kmeans_iters}")
        missing = [m for m in mods if m not in in_dims]
        if missing:
            raise ObjectiveError(f"clustering: no {feature} width for modality {missing[0]!r}")
        self.variant, self.modalities, self.feature = variant, mods, feature
        self.num_clusters, self.refresh_every = num_clusters, refresh_every
        self.samples_per_refresh = samples_per_refresh
        self.kmeans_iters, self.spherical, self.reset_heads, self.seed, self.gather = (
            kmeans_iters, spherical, reset_heads, seed, gather)
        self.in_dims = {m: in_dims[m] for m in mods}
        if variant == "deepcluster":
            self.pairs = [(m, m) for m in mods]
        elif variant == "xdc":
            self.pairs = [(mods[0], mods[1]), (mods[1], mods[0])]
        elif variant == "mdc":
            self.pairs = [(m, c) for m in mods for c in mods]
        else:
            self.pairs = [(m, JOINT) for m in mods]
        self.clusterings = [JOINT] if variant == "cdc" else list(dict.fromkeys(c for _, c in self.pairs))
        self.heads = nn.ModuleDict({self.head_name(m, c): nn.Linear(self.in_dims[m], num_clusters)
                                    for m, c in self.pairs})
        self._init_heads(step=-1)
        self.labels: dict[str, dict[str, int]] = {c: {} for c in self.clusterings}
        self.refresh_step = -1
        self.last_refresh: dict[str, dict[str, Any]] = {}  # kmeans info per clustering (inspection, tests)
        self.requires = Requirements(modalities=tuple(mods), needs_pseudo_labels=True, gathers_across_ranks=gather)

    @classmethod
    def from_config(cls, cfg: ClusteringConfig, spec: ModelSpec | None = None) -> ClusteringObjective:
        if spec is None:
            raise ObjectiveError("clustering needs the model spec to size its classifier heads")
        if cfg.feature == "embeddings":
            dims = {m: spec.embed_dim for m in cfg.modalities}
        else:
            dims = {m: spec.feature_dims[base_modality(m)] for m in cfg.modalities
                    if base_modality(m) in spec.feature_dims}
        return cls(cfg.variant, cfg.modalities, dims, num_clusters=cfg.num_clusters, refresh_every=cfg.refresh_every,
                   samples_per_refresh=cfg.samples_per_refresh, kmeans_iters=cfg.kmeans_iters, feature=cfg.feature,
                   spherical=cfg.spherical, reset_heads=cfg.reset_heads, seed=cfg.seed)

    @staticmethod
    def head_name(modality: str, clustering: str) -> str:
        return f"{modality}_to_{clustering}"

    def _init_heads(self, step: int, clusterings: set[str] | None = None) -> None:
        """``W ~ N(0, 0.01²)``, ``b = 0`` for the heads predicting ``clusterings`` (all: None), from a generator
        seeded by (seed, step): identical on every rank."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 1)
        for m, c in sorted(self.pairs):
            head = self.heads[self.head_name(m, c)]
            if clusterings is not None and c not in clusterings:
                continue
            assert isinstance(head, nn.Linear)
            w = torch.randn(head.out_features, head.in_features, generator=gen) * 0.01
            dev = head.weight.device
            _reinit_(head.weight, w.to(device=dev, dtype=head.weight.dtype))
            _reinit_(head.bias, torch.zeros(head.out_features, device=dev, dtype=head.bias.dtype))

    # ---- pseudo-label service -------------------------------------------------------------------------------
    def _rows(self, outputs: ModelOutputs, clustering: str, n: int, dev: torch.device) -> tuple[Tensor, Tensor]:
        """(row mask, features) that ``clustering`` clusters in one feature batch of ``n`` rows."""
        mods = self.modalities if clustering == JOINT else [clustering]
        got = [modality_rows(outputs, self.feature, m, n, self.in_dims[m], dev) for m in mods]
        mask = torch.stack([p.to(dev) for p, _ in got]).all(0)
        parts = [f.detach().float().to(dev) for _, f in got]
        if clustering != JOINT:
            return mask, parts[0]
        return mask, torch.cat([F.normalize(p, dim=1) if self.spherical else p for p in parts], dim=1)

    def refresh(self, step: int, features: FeatureSource) -> dict[str, float]:
        """Cluster this rank's first ``ceil(samples_per_refresh / world)`` samples of ``features()`` together with
        every other rank's, identically on every rank, and replace the labels (see the module docstring)."""
        size = world()[1] if self.gather else 1
        quota = math.ceil(self.samples_per_refresh / size)
        dev = self.heads[self.head_name(*self.pairs[0])].weight.device
        width = {c: (sum(self.in_dims.values()) if c == JOINT else self.in_dims[c]) for c in self.clusterings}
        keys: dict[str, list[str]] = {c: [] for c in self.clusterings}
        rows: dict[str, list[Tensor]] = {c: [] for c in self.clusterings}
        taken = 0
        batches = features()
        try:
            for batch_keys, outputs in batches:
                n = min(len(batch_keys), quota - taken)
                for c in self.clusterings:
                    mask, feats = self._rows(outputs, c, len(batch_keys), dev)
                    idx = mask[:n].nonzero().squeeze(1)
                    keys[c].extend(batch_keys[i] for i in idx.tolist())
                    rows[c].append(feats[idx])
                taken += n
                if taken >= quota:
                    break
        finally:
            close = getattr(batches, "close", None)
            if close is not None:  # runs the source's clean-up (model.train()) now, not at garbage collection
                close()
        metrics: dict[str, float] = {}
        new_labels: dict[str, dict[str, int]] = {}
        for idx_c, c in enumerate(self.clusterings):
            local = torch.cat(rows[c]) if rows[c] else torch.zeros(0, width[c], device=dev)
            all_keys, x = gather_keyed_rows(keys[c], local) if self.gather else (keys[c], local)
            first = {k: i for i, k in reversed(list(enumerate(all_keys)))}  # first occurrence of each key
            order = sorted(first.values())
            all_keys, x = [all_keys[i] for i in order], x[torch.tensor(order, dtype=torch.long, device=x.device)]
            if len(all_keys) < self.num_clusters:
                warnings.warn(f"clustering refresh at step {step}: {len(all_keys)} samples for {c!r} are fewer than "
                              f"num_clusters={self.num_clusters}; keeping the previous labels", stacklevel=2)
                metrics[f"{c}/skipped"] = 1.0
                continue
            _, assign, info = kmeans(x, self.num_clusters, self.kmeans_iters, seed=self.seed + 7919 * step + idx_c,
                                     spherical=self.spherical)
            if size > 1:  # bit-identical labels on every rank, whatever the device's arithmetic
                dist.broadcast(assign, src=0)
                info["counts"] = torch.bincount(assign, minlength=self.num_clusters).cpu()
            self.last_refresh[c] = info
            new_labels[c] = dict(zip(all_keys, assign.tolist(), strict=True))
            metrics.update(self._stats(c, info, new_labels[c]))
        self.labels.update(new_labels)
        self.refresh_step = step
        if self.reset_heads and new_labels:
            self._init_heads(step, set(new_labels))
        return metrics

    def _stats(self, c: str, info: dict[str, Any], labels: dict[str, int]) -> dict[str, float]:
        counts = info["counts"].double()
        p = counts / counts.sum()
        nz = p[p > 0]
        out = {f"{c}/samples": float(counts.sum()), f"{c}/entropy": float(-(nz * nz.log()).sum()) /
               math.log(self.num_clusters), f"{c}/min_size": float(counts.min()), f"{c}/max_size": float(counts.max()),
               f"{c}/inertia": float(info["inertia"]), f"{c}/reseeded": float(info["reseeded"])}
        old = self.labels.get(c, {})
        common = [k for k in labels if k in old]
        if len(common) > 1:
            out[f"{c}/nmi_prev"] = normalized_mutual_info(torch.tensor([old[k] for k in common]),
                                                          torch.tensor([labels[k] for k in common]))
        return out

    def get_extra_state(self) -> dict[str, Any]:
        return {"step": self.refresh_step,
                "labels": {c: {"keys": list(d), "labels": torch.tensor(list(d.values()), dtype=torch.long)}
                           for c, d in self.labels.items()}}

    def set_extra_state(self, state: Any) -> None:
        unknown = sorted(set(state["labels"]) - set(self.clusterings))
        if unknown:
            raise ObjectiveError(f"clustering state has labels for {unknown}, not among {self.clusterings}")
        self.refresh_step = int(state["step"])
        self.labels = {c: {} for c in self.clusterings}
        for c, d in state["labels"].items():
            self.labels[c] = dict(zip(d["keys"], d["labels"].tolist(), strict=True))

    # ---- loss -----------------------------------------------------------------------------------------------
    def forward(self, outputs: ModelOutputs, batch: Any = None, model: Any = None) -> LossOutput:
        keys = getattr(batch, "keys", None)
        if keys is None:
            raise ObjectiveError("clustering needs the batch's sample keys (batch.keys) to look up pseudo-labels")
        dev = self.heads[self.head_name(*self.pairs[0])].weight.device
        targets: dict[str, Tensor] = {}
        terms: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {}
        total: Tensor | None = None
        for m, c in self.pairs:
            present, f = modality_rows(outputs, self.feature, m, len(keys), self.in_dims[m], dev)
            f = f.float().masked_fill(~present.unsqueeze(1), 0.0)  # absent rows may hold anything
            if c not in targets:
                table = self.labels[c]
                targets[c] = torch.tensor([table.get(k, -1) for k in keys], dtype=torch.long, device=f.device)
            labels = targets[c].masked_fill(~present, -1)
            name = self.head_name(m, c)
            head = self.heads[name]
            logits = head(f.to(head.weight.dtype)).float()  # heads are bf16 under a bf16 engine
            loss, head_metrics = pseudo_label_loss(logits, labels, gather=self.gather)
            terms[name] = loss.detach()
            metrics.update({f"{name}/{k}": v for k, v in head_metrics.items()})
            total = loss if total is None else total + loss
        assert total is not None
        return LossOutput(loss=total / len(self.pairs), terms=terms, metrics=metrics)


# ---- SwAV -----------------------------------------------------------------------------------------------------------
@dataclass
class SwAVConfig:
    """``objectives.swav`` in a recipe."""

    weight: float = 1.0
    modalities: list[str] = field(default_factory=list)
    num_prototypes: int = 64
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    freeze_prototypes_steps: int = 0


class SwapClusteringObjective(Objective):
    """SwAV / SeLaVi online balanced clustering with swapped prediction (see the module docstring)."""

    def __init__(self, modalities: Sequence[str], embed_dim: int, *, num_prototypes: int = 64,
                 temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iters: int = 3,
                 freeze_prototypes_steps: int = 0, gather: bool = True) -> None:
        super().__init__()
        mods = list(modalities)
        if len(mods) != 2 or mods[0] == mods[1]:
            raise ObjectiveError(f"swav `modalities` must name two different modalities or views, got {mods}")
        if num_prototypes < 2:
            raise ObjectiveError(f"num_prototypes must be >= 2, got {num_prototypes}")
        for name, value in (("temperature", temperature), ("epsilon", epsilon)):
            if not value > 0:
                raise ObjectiveError(f"{name} must be > 0, got {value}")
        if sinkhorn_iters < 1 or freeze_prototypes_steps < 0:
            raise ObjectiveError(f"sinkhorn_iters must be >= 1 and freeze_prototypes_steps >= 0, got "
                                 f"{sinkhorn_iters}, {freeze_prototypes_steps}")
        self.modalities = mods
        self.temperature, self.epsilon, self.sinkhorn_iters = temperature, epsilon, sinkhorn_iters
        self.freeze_prototypes_steps, self.gather = freeze_prototypes_steps, gather
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_prototypes, embed_dim), dim=1))
        self.steps_done = 0
        self.requires = Requirements(modalities=tuple(mods), gathers_across_ranks=gather)

    @classmethod
    def from_config(cls, cfg: SwAVConfig, spec: ModelSpec | None = None) -> SwapClusteringObjective:
        if spec is None:
            raise ObjectiveError("swav needs the model spec (embed_dim) to size its prototypes")
        return cls(cfg.modalities, spec.embed_dim, num_prototypes=cfg.num_prototypes, temperature=cfg.temperature,
                   epsilon=cfg.epsilon, sinkhorn_iters=cfg.sinkhorn_iters,
                   freeze_prototypes_steps=cfg.freeze_prototypes_steps)

    def no_weight_decay(self) -> set[str]:
        return {"prototypes"}  # normalised in the forward: decay would only shrink the norm

    def after_step(self, model: nn.Module) -> None:
        self.steps_done += 1

    def get_extra_state(self) -> dict[str, int]:
        return {"steps_done": self.steps_done}

    def set_extra_state(self, state: Any) -> None:
        self.steps_done = int(state["steps_done"])

    def forward(self, outputs: ModelOutputs, batch: Any = None, model: Any = None) -> LossOutput:
        a, b = self.modalities
        protos = self.prototypes
        frozen = self.steps_done < self.freeze_prototypes_steps
        if frozen:  # zero gradient, parameter still in the graph
            protos = protos.detach() + protos * 0.0
        keys = getattr(batch, "keys", None)
        rows = len(keys) if keys is not None else next(iter(outputs.present.values())).shape[0]
        (pa, za), (pb, zb) = (modality_rows(outputs, "embeddings", m, rows, protos.shape[1], protos.device)
                              for m in (a, b))
        loss, metrics = swav_loss(za, zb, protos, temperature=self.temperature, valid=pa & pb,
                                  epsilon=self.epsilon, sinkhorn_iters=self.sinkhorn_iters, gather=self.gather)
        metrics["prototypes_frozen"] = loss.new_tensor(float(frozen))
        return LossOutput(loss=loss, terms={f"{a}-{b}": loss.detach()}, metrics=metrics)

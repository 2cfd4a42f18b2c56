"""The objective contract.

An objective takes the model's outputs for a batch (dicts keyed by modality: ``embeddings``, ``pooled``,
``tokens``, ``token_mask``, ``present``, ``fused``), the batch itself (sample keys, raw inputs for targets) and the
model (for the extra forwards some objectives make: fusion of negative pairs, masked views), and returns a
`LossOutput`. It declares what it needs in `Requirements`, so a recipe whose model cannot provide it fails before
launch with a message naming both sides (`Objective.check` against the model's `ModelSpec`).

Objectives see models only structurally (the `ModelOutputs`, `ModelSpec` and `MultimodalModel` protocols):
nothing in ``objectives/`` imports an architecture. Masked prediction asks the model for a modality's mask, target
and masked encoding (`MultimodalModel.mask`, ``target``, ``encode_masked``), so the masks training uses are the
modality plug-ins' own and "how many tokens a ratio masks" has one formula, the model's.

Views: a batch may carry a second augmented view of a modality under ``"<modality>@1"`` (``"audio@1"``); models
encode it with the tower of ``<modality>``. `base_modality` maps a view name back.

Decoder blocks: an objective that owns a decoder (``prefix_lm``, ``mae``, ``joint_mae``) keeps its own embeddings,
mask token, positions and heads, but takes its transformer blocks from the model's spec: ``spec.block(width, heads,
mlp_ratio)`` (`decoder_blocks`) builds the architectures' one pre-norm block, called as ``block(x, key_mask=None, *,
allowed=None)`` (masks True = may attend; a query with no key gets a zero update). Attention, with its mask
convention and its parameter layout, is then written once, in ``architectures/layers``, while objectives still import
no architecture: the spec hands them the block as it hands them the widths they size their heads from, and a spec
built without a model (tests, tools) gets the same block by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

VIEW_SEP = "@"

MaskGenerators = torch.Generator | Sequence[torch.Generator] | None  # one per row, one for all rows, or torch's


def base_modality(name: str) -> str:
    """``"audio@1" -> "audio"``; a plain modality name is returned unchanged."""
    return name.split(VIEW_SEP, 1)[0]


class ObjectiveError(ValueError):
    """An objective configured in a way that cannot work (bad pair, missing modality, bad hyper-parameter)."""


def check_pairs(kind: str, pairs: Any) -> list[tuple[str, str]]:
    """The ``pairs`` option of a pairwise objective as a list of distinct modality pairs; `ObjectiveError` naming
    the bad pair otherwise."""
    if not pairs:
        raise ObjectiveError(f"{kind} objective needs at least one modality pair in `pairs`")
    checked = []
    for pair in pairs:
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ObjectiveError(f"{kind} pair {list(pair)!r} must name two different modalities")
        checked.append((str(pair[0]), str(pair[1])))
    if len(set(checked)) != len(checked):
        raise ObjectiveError(f"{kind} pairs {[list(p) for p in checked]} repeat a pair")
    return checked


def subset_presence(present: Mapping[str, Tensor], modalities: Sequence[str]) -> Mapping[str, Tensor]:
    """``present`` restricted to ``modalities``, keeping what the batch's presence knows on the host (its
    ``subset``: the row counts that spare a model a device read) where it has it."""
    subset = getattr(present, "subset", None)
    if subset is not None:
        return subset(modalities)
    return {m: present[m] for m in modalities if m in present}


def learned_scale(log_scale: Tensor, max_log: float) -> Tensor:
    """``s = exp(clamp(log_s, 0, max_log))`` as a 0-dim fp32 tensor, for every learned logit scale (CLIP's ``1/τ``).

    Exponentiated in fp32 whatever the parameter's dtype: under bf16 training the engine's copy of ``log_s`` is
    bf16 (its fp32 master lives in the optimizer) and an exponential computed in bf16 would round ``s`` once more
    to 8 significant bits."""
    return log_scale.float().clamp(0.0, max_log).exp().squeeze(0)


class ModelOutputs(Protocol):
    embeddings: dict[str, Tensor]  # [B, E] projected, not normalised
    pooled: dict[str, Tensor]  # [B, D_m] tower features
    tokens: dict[str, Tensor]  # [B, T_m, D_m] token states (feature maps flattened to tokens)
    token_mask: dict[str, Tensor]  # bool [B, T_m], True where a token is real (not padding)
    present: dict[str, Tensor]  # bool [B]
    fused: dict[str, Tensor]  # fusion outputs of the model's own forward, when it has a fusion module
    fusion_inputs: dict[str, Tensor]  # what `fuse` takes for a modality where that is not `tokens` (stitched LMs)
    fusion_mask: dict[str, Tensor]  # their masks, where they differ from `token_mask`


def fusion_view(outputs: ModelOutputs, modality: str) -> tuple[Tensor, Tensor]:
    """``(states [B, T, D], bool mask [B, T])`` of ``modality`` as ``model.fuse`` takes them: the model's
    ``fusion_inputs`` where it gives them, else its ``tokens`` (a missing mask means every token is real)."""
    if modality in outputs.fusion_inputs:
        states = outputs.fusion_inputs[modality]
        mask = outputs.fusion_mask.get(modality, outputs.token_mask.get(modality))
    else:
        states, mask = outputs.tokens[modality], outputs.token_mask.get(modality)
    if mask is None:
        mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
    return states, mask.bool()


def fused_summary(model: Any, fused: Tensor, query_mask: Tensor) -> Tensor:
    """``[B, F]``: the fused state that stands for the whole pair, read by matching heads. ``fused[:, 0]`` (the
    query's CLS) unless the model names another position with a ``fused_summary(fused, query_mask)`` method (a
    causal LM's last real token, the only one that has seen every other)."""
    hook = getattr(model, "fused_summary", None)
    return hook(fused, query_mask) if hook is not None else fused[:, 0]


BlockFactory = Callable[..., nn.Module]
"""``ModelSpec.block``: ``block(width, heads, mlp_ratio) -> module``, the module called as ``block(x, key_mask=None, *,
allowed=None)`` on ``x`` ``[B, S, width]`` (module docstring)."""


@runtime_checkable
class ModelSpec(Protocol):
    """What an objective may know about a model when it is built (sizes of the heads it owns) and validated."""

    modalities: tuple[str, ...]
    embed_dim: int
    feature_dims: dict[str, int]  # pooled width per modality
    token_dims: dict[str, int]  # token width per modality
    fusion_dim: int | None  # width of the fusion module's states; None: the model has no fusion module
    vocab_sizes: dict[str, int]  # per token-id modality (text)
    special_tokens: dict[str, dict[str, int]]  # per token-id modality: {"pad": .., "mask": .., "bos": .., "eos": ..}
    # masked prediction: the mask kinds `MultimodalModel.mask` draws per modality (its default first) ...
    mask_kinds: dict[str, tuple[str, ...]]
    # ... and, per modality whose tower encodes a masked view (`MultimodalModel.encode_masked`), the grid of the
    # T tokens its mask and target run over (row-major: (rows, cols) patches, (groups, rows, cols) tubelets, (T,)
    # steps) and the width P of its target [B, T, P]
    mask_grids: dict[str, tuple[int, ...]]
    mask_targets: dict[str, int]
    family: str
    block: BlockFactory  # the model's pre-norm transformer block, for the decoders objectives own (module docstring)


def decoder_blocks(block: BlockFactory, depth: int, width: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    """``depth`` decoder blocks from the model's ``spec.block`` factory; `ObjectiveError` when ``width`` is not a
    multiple of ``heads``."""
    if heads < 1 or width % heads:
        raise ObjectiveError(f"width={width} must be divisible by heads={heads}")
    return nn.ModuleList(block(width, heads, mlp_ratio) for _ in range(depth))


class MultimodalModel(Protocol):
    """The calls an objective may make on the model, beyond the outputs it is given."""

    def __call__(self, inputs: Mapping[str, Any], present: Mapping[str, Tensor] | None = None) -> ModelOutputs: ...

    def fuse(self, tokens: Mapping[str, Tensor], token_mask: Mapping[str, Tensor], query: str) -> Tensor:
        """Fused states ``[B, T_query, fusion_dim]``: ``query``'s tokens attending to the other modalities'
        (each given as `fusion_view` reads it from the outputs). A model may also define
        ``fused_summary(fused, query_mask) -> [B, fusion_dim]`` (see `fused_summary`)."""
        ...

    def mask(self, modality: str, x: Any, ratio: float, generator: MaskGenerators = None, *,
             kind: str | None = None, span_length: int = 1) -> Tensor:
        """``bool[B, T]``, True = masked, over the ``T`` tokens of ``modality``'s masked view (its tower's tokens,
        row-major over ``spec.mask_grids[modality]``; text: its ids): the modality plug-in's mask of ``kind``
        (one of ``spec.mask_kinds[modality]``, default the first) at ``ratio`` (for ``span``: the share of steps
        that start a span of ``span_length``). Drawn where ``x`` lives from ``generator`` (one per row, or one
        for all, or None): give the host batch's ``x`` (``batch.host``) and nothing waits for the device. Every
        count of "``ratio`` of ``n`` tokens" is the model's one formula; objectives read counts off the mask."""
        ...

    def target(self, modality: str, x: Any) -> Tensor:
        """The per-token reconstruction target ``[B, T, P]`` (``P = spec.mask_targets[modality]``; text: the ids
        ``[B, L]``), aligned with `mask`'s tokens."""
        ...

    def encode_masked(self, modality: str, x: Any, mask: Tensor, *, mask_token: Tensor | None = None,
                      visible: int | None = None) -> Tensor:
        """``modality``'s token states under ``mask`` (a modality in ``spec.mask_targets``). With ``mask_token``
        (``[D]``, replace mode: BEiT, HuBERT): ``[B, prefix + T, D]``, the last ``T`` aligned with the mask; without
        (drop mode: MAE): only unmasked tokens are encoded, ``[B, prefix + visible, D]``, each row's unmasked tokens
        in token order in the slots after the prefix (``visible``: at least any row's unmasked count; a row with
        fewer has filler slots at its end, not to be read). ``prefix``: leading states that stand for no masked
        token (class tokens, a video tower's frame states)."""
        ...


FeatureSource = Callable[[], Iterator[tuple[list[str], ModelOutputs]]]
"""A pass over a sample of the training stream on this rank: ``(sample keys, model outputs)`` per batch, computed
without gradient by the current model (what a pseudo-label service clusters)."""


class _LossFields(NamedTuple):
    loss: Tensor
    terms: dict[str, Tensor]
    metrics: dict[str, Tensor]


class LossOutput(_LossFields):
    """``loss``: the scalar to minimise on this rank; ``terms``: named sub-losses (detached, for logging);
    ``metrics``: further logged scalars (detached); both default to fresh empty dicts.

    A named tuple, not a dataclass, so that DeepSpeed ZeRO-3 sees ``loss`` and hooks it to re-gather the
    objective's own parameters (a learned temperature, prototypes) before its backward; hidden in a dataclass,
    a parameter saved for backward is read partitioned (size 0) in the first step's backward and its gradient is
    silently lost."""

    __slots__ = ()

    def __new__(cls, loss: Tensor, terms: dict[str, Tensor] | None = None,
                metrics: dict[str, Tensor] | None = None) -> LossOutput:
        return super().__new__(cls, loss, {} if terms is None else terms, {} if metrics is None else metrics)


@dataclass(frozen=True)
class Requirements:
    modalities: tuple[str, ...] = ()  # modalities (or views "m@1") the batch and the model must provide
    needs_fusion: bool = False
    needs_decoder: bool = False  # a decoder the model or the objective owns, fed by the model's tokens
    needs_masked_view: tuple[str, ...] = ()  # modalities whose tower must encode a masked input
    needs_pseudo_labels: bool = False
    gathers_across_ranks: bool = False


class Objective(nn.Module):
    """Base class: subclasses set ``requires`` and implement ``forward(outputs, batch, model)``.

    Optional hooks the trainer calls: ``bind(model)`` once after building (objectives that keep a copy of the
    model, e.g. a momentum teacher); ``refresh(step, features)`` every ``refresh_every`` steps (pseudo-label
    services); ``after_step(model)`` after each optimizer step (EMA updates).
    """

    requires: Requirements
    refresh_every: int = 0
    max_zero_stage: int = 3  # objectives that copy or update model weights themselves (EMA teachers) need <= 2

    def forward(self, outputs: ModelOutputs, batch: Any = None, model: MultimodalModel | None = None) -> LossOutput:
        raise NotImplementedError

    def bind(self, model: nn.Module) -> None:
        """Called once with the model, before the engine is built."""

    def refresh(self, step: int, features: FeatureSource) -> dict[str, float]:
        """Recompute pseudo-labels from a feature pass; returns metrics to log."""
        return {}

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step."""

    def check(self, spec: ModelSpec | Mapping[str, Any] | list[str], where: str) -> None:
        """Raise `ObjectiveError` naming ``where`` when the model cannot give what this objective needs."""
        modalities = spec.modalities if isinstance(spec, ModelSpec) else tuple(spec)
        towers = sorted(set(modalities))
        missing = [m for m in self.requires.modalities if base_modality(m) not in modalities]
        if missing:
            raise ObjectiveError(
                f"{where} needs modality {missing[0]!r}, which the model does not have (model towers: {towers})"
            )
        if not isinstance(spec, ModelSpec):
            return
        if self.requires.needs_fusion and spec.fusion_dim is None:
            raise ObjectiveError(
                f"{where} needs a fusion module, which model.family={spec.family!r} does not have "
                "(use model.family: late_fusion)"
            )
        for m in self.requires.needs_masked_view:
            if m not in spec.mask_targets and m not in spec.vocab_sizes:
                raise ObjectiveError(
                    f"{where} needs a masked view of {m!r}, which its tower cannot encode "
                    f"(maskable: {sorted(set(spec.mask_targets) | set(spec.vocab_sizes))})"
                )

"""A unified encoder with early fusion: one shared transformer for every modality (VATT, Akbari et al. 2021;
HighMMT, Liang et al. 2022), optionally with modality experts (VLMo, Bao et al. 2022) and a Perceiver latent
bottleneck (Jaegle et al. 2021).

**Unimodal pass** (every modality ``m`` given, each encoded on its own, so a unimodal batch costs only its own
modality and a modality's outputs never depend on which other modalities are in the batch)::

    e_m  = Embed_m(x_m) + t_m                                  tokeniser (positions included) + type embedding t_m
    s_m  = [c_m + t_m ; e_m]                                   latents == 0
    s_m  = [c_m + t_m ; Perceiver(e_m) + t_m]                  latents  > 0: L latents instead of T_m tokens
    e_m  = DropToken_p(e_m)                                    training, p = drop_tokens[m] > 0 (before both)
    h_m  = LN(Blocks(s_m))                                     the shared backbone; expert m when experts=True
    pooled[m] = h_m[:, 0],   tokens[m] = h_m[:, 1:],   embeddings[m] = Head_m(pooled[m])

``c_m`` is the modality's learned [CLS]-like token. **DropToken** (VATT, Akbari et al. 2021, §3.3): in
training mode, each row keeps a uniformly random ``max(1, ⌊(1 - p)·T_m⌋)`` of its ``T_m`` tokens (real
tokens before padding), in input order, so the backbone runs on fewer tokens; evaluation sees every token. A
dropped modality's ``tokens[m]`` in training are the kept tokens' states, not aligned with the input
(`token_aligned` is False for it: no per-input-token objective on it).

Otherwise ``tokens[m]`` (``[B, T_m, D]``) and ``token_mask[m]`` (``bool[B, T_m]``, the tokeniser's mask) are aligned
with the tokeniser's tokens — position ``t`` is input token ``t``, the [CLS] state is only in ``pooled`` — so
objectives written for tower outputs (MLM selecting ``[B, T]`` positions of the input ids) work unchanged. With
``latents > 0`` they are instead the ``L`` latents' states ``[B, L, D]`` (mask all True): no longer aligned with the
input, so per-input-token objectives (MLM, masked cross-modal prediction) cannot be used;
``tokens_align_with_inputs`` says which case holds. A view ``"audio@1"`` is encoded by the tokeniser, type
embedding, [CLS], expert and head of ``"audio"``.

**Joint pass** (``fused[query]``, when ``query`` and at least one other plain modality — not a view — are given):
the segments of all given plain modalities are concatenated (``query`` first) and attend to each other in one
sequence; only ``query``'s token segment ``[B, T_q, D]`` is returned, aligned with ``tokens[query]``. Attention
keys are masked where a token is padding and, for every modality but ``query``, in rows where that modality is
absent (``present`` False), so such a row's fused output is exactly what the joint pass gives for that row without
the modality. The query's own tokens keep only their padding mask (its absent rows' outputs are meaningless but
finite).

* ``fusion_depth > 0`` (late-ish fusion on a shared backbone, VLMo's fusion layers): the segments are the final
  token states ``tokens[m]`` (no [CLS]), passed through ``fusion_depth`` extra blocks (shared attention over all
  tokens; their FFN is the fusion expert when ``experts=True``, a plain shared FFN otherwise), then ``LN_f``.
  ``fused[query] = fuse(tokens, token_mask masked by present, query)`` exactly, and `fuse` is the same pass on any
  aligned token set (negative pairs of matching, masked cross-modal prediction); it also takes the query alone,
  and a row whose other modalities are absent equals ``fuse({query: tokens[query]})`` for that row.
* ``fusion_depth == 0`` (pure early fusion, the single-stream VATT/HighMMT design): the segments are the embedded
  inputs ``s_m`` ([CLS] included) and the joint pass runs the whole shared backbone (modality experts routed per
  segment) and ``LN``; the query's [CLS] position is dropped from the result. A row whose other modalities are all
  absent therefore gets exactly its unimodal ``tokens[query]``. Fusing raw inputs cannot be recomputed from final
  token states, so `fuse` raises: objectives that fuse negative pairs (matching, masked cross-modal prediction)
  need ``fusion_depth > 0``.

**timm contract**: ``forward_features`` returns the full final states ``h_m`` ``[B, 1+T_m, D]`` ([CLS] first, as a
timm ViT's do), so ``tokens[m] == forward_features(x)[m][:, 1:]``; ``forward_head`` pools their [CLS] state.

No statistic is computed across rows (LayerNorm, per-sample DropPath), so every row's outputs depend on that row
alone, and padded tokens — masked as attention keys everywhere — change no output at a real token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmssl.architectures.embedders import TokenEmbedder
from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.heads import ProjectionHead
from mmssl.architectures.layers.blocks import Block, Route, init_vit_weights
from mmssl.architectures.layers.perceiver import Perceiver
from mmssl.architectures.masked_views import MaskedViews
from mmssl.architectures.outputs import ModelOutput, ModelSpec, tower_name

FUSION_EXPERT = "fusion"  # the FFN expert of the fusion blocks with experts=True (VLMo's "VL" expert)


class _Encoded(NamedTuple):
    sequence: Tensor  # s_m: the backbone's input [B, 1+T, D]
    keep: Tensor  # bool [B, 1+T], True at [CLS] and real tokens
    states: Tensor  # h_m: final states after the backbone and its norm [B, 1+T, D], [CLS] first


class _PerModalityVectors(nn.Module):
    """One learned ``[1, 1, width]`` parameter per modality, named by the modality (state-dict key ``<m>``), used
    by calling the module rather than by indexing it, so that DeepSpeed ZeRO-3 gathers them in forward and again
    in backward: its hooks fire on module calls and follow tensor outputs, and the root's output is a
    `ModelOutput` they cannot see into (an indexed `nn.ParameterDict` stays partitioned, size 0, in backward)."""

    def __init__(self, modalities: list[str], width: int) -> None:
        super().__init__()
        for m in modalities:
            self.register_parameter(m, nn.Parameter(torch.empty(1, 1, width)))  # initialised by the owner

    def vector(self, name: str) -> Tensor:
        return self._parameters[name]  # type: ignore[return-value]


class TypeEmbeddings(_PerModalityVectors):
    """The type embeddings ``t_m``: ``type_embeds(m, x) = x + t_m`` for ``x`` ``[B, T, D]``."""

    def forward(self, name: str, x: Tensor) -> Tensor:
        return x + self.vector(name).to(x.dtype)


class ClassTokens(_PerModalityVectors):
    """The learned [CLS]-like tokens ``c_m``: ``cls_tokens(m, batch, dtype)`` is ``c_m`` for ``batch`` rows,
    ``[B, 1, D]``."""

    def forward(self, name: str, batch: int, dtype: torch.dtype) -> Tensor:
        return self.vector(name).to(dtype).expand(batch, -1, -1)


def drop_tokens(tokens: Tensor, keep: Tensor, rate: float) -> tuple[Tensor, Tensor]:
    """DropToken: ``max(1, ⌊(1 - rate)·T⌋)`` tokens of each row of ``tokens`` ``[B, T, D]`` drawn uniformly without
    replacement (real tokens, ``keep`` True, before padding), in input order; returns them and their ``keep``."""
    b, t, d = tokens.shape
    k = max(1, int(t * (1.0 - rate)))
    score = torch.rand(b, t, device=tokens.device) + (~keep).float()  # padding sorts after every real token
    index = score.argsort(dim=1)[:, :k].sort(dim=1).values
    return tokens.gather(1, index[..., None].expand(-1, -1, d)), keep.gather(1, index)


class UnifiedModel(MaskedViews, nn.Module):
    """The model of the module docstring. ``embedders``: one `TokenEmbedder` per modality, all ``width`` wide."""

    family = "unified"

    def __init__(self, embedders: Mapping[str, TokenEmbedder], *, width: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0, embed_dim: int, head: str = "linear", experts: bool = False,
                 fusion_depth: int = 0, latents: int = 0, latent_depth: int = 1, drop_path: float = 0.0,
                 query: str = "text", drop_token_rates: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.drop_token_rates = {m: float(r) for m, r in (drop_token_rates or {}).items() if r}
        _validate(embedders, width=width, depth=depth, heads=heads, fusion_depth=fusion_depth, latents=latents,
                  latent_depth=latent_depth, drop_path=drop_path, query=query, drop_token_rates=self.drop_token_rates)
        self.width, self.depth, self.fusion_depth, self.query, self.experts = width, depth, fusion_depth, query, experts
        self.num_features = width
        self.tokens_align_with_inputs = latents == 0  # False: tokens are latent states (no per-input-token loss)
        self.embedders = nn.ModuleDict(dict(embedders))
        self.cls_tokens = ClassTokens(list(embedders), width)
        self.type_embeds = TypeEmbeddings(list(embedders), width)
        self.perceiver = Perceiver(width, heads, latents, latent_depth, mlp_ratio) if latents > 0 else None
        total = depth + fusion_depth  # drop-path rates rise linearly (plain floats: builds on the meta device too)
        rates = [drop_path * i / max(1, total - 1) for i in range(total)]
        modality_experts = list(embedders) if experts else None
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, experts=modality_experts, drop_path=rates[i])
                                    for i in range(depth))
        self.norm = nn.LayerNorm(width)
        fusion_experts = [FUSION_EXPERT] if experts else None
        self.fusion_blocks = nn.ModuleList(Block(width, heads, mlp_ratio, experts=fusion_experts,
                                                 drop_path=rates[depth + i]) for i in range(fusion_depth))
        self.fusion_norm = nn.LayerNorm(width) if fusion_depth > 0 else None
        for p in (*self.cls_tokens.parameters(), *self.type_embeds.parameters()):
            nn.init.trunc_normal_(p, std=0.02)
        for module in (self.blocks, self.norm, self.fusion_blocks, self.fusion_norm):
            if module is not None:
                module.apply(init_vit_weights)
        self.heads = nn.ModuleDict({m: ProjectionHead(width, embed_dim, head) for m in embedders})
        self.grad_checkpointing = False
        self.spec: ModelSpec | None = None  # set by the integrator's build_model

    @property
    def modalities(self) -> list[str]:
        return list(self.embedders)

    def token_aligned(self, modality: str) -> bool:
        """Whether ``tokens[modality]`` in training are aligned with the input tokens (no Perceiver latents, no
        DropToken on it), as per-input-token objectives (MLM, masked modelling) need."""
        return self.tokens_align_with_inputs and tower_name(modality) not in self.drop_token_rates

    # unimodal pass ---------------------------------------------------------------------------------------------
    def _check_known(self, keys: Any) -> None:
        unknown = sorted(m for m in keys if tower_name(m) not in self.embedders)
        if unknown:
            raise ArchitectureError(f"the unified model has no embedder for modality {unknown[0]!r} "
                                    f"(modalities: {self.modalities})")

    def _sequence(self, name: str, x: Any) -> tuple[Tensor, Tensor]:
        """``s_m`` and its key mask (see the module docstring)."""
        embedded = self.embedders[name](x)
        body, keep = self.type_embeds(name, embedded.tokens), embedded.mask.bool()
        if self.training and name in self.drop_token_rates:
            body, keep = drop_tokens(body, keep, self.drop_token_rates[name])
        if self.perceiver is not None:
            body = self.type_embeds(name, self.perceiver(body, keep))
            keep = torch.ones(body.shape[:2], dtype=torch.bool, device=body.device)
        batch = body.shape[0]
        cls = self.type_embeds(name, self.cls_tokens(name, batch, body.dtype))
        cls_keep = torch.ones(batch, 1, dtype=torch.bool, device=body.device)
        return torch.cat([cls, body], dim=1), torch.cat([cls_keep, keep], dim=1)

    def _run(self, blocks: nn.ModuleList, x: Tensor, keep: Tensor, route: Route) -> Tensor:
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, keep, route=route, use_reentrant=False)
            else:
                x = block(x, keep, route=route)
        return x

    def _encode(self, inputs: Mapping[str, Any]) -> dict[str, _Encoded]:
        self._check_known(inputs)
        encoded = {}
        for m, x in inputs.items():
            name = tower_name(m)
            sequence, keep = self._sequence(name, x)
            states = self.norm(self._run(self.blocks, sequence, keep, [(name, sequence.shape[1])]))
            encoded[m] = _Encoded(sequence, keep, states)
        return encoded

    # joint pass ------------------------------------------------------------------------------------------------
    def _joint(self, segments: Mapping[str, Tensor], keeps: Mapping[str, Tensor], query: str, blocks: nn.ModuleList,
               norm: nn.Module, expert: Callable[[str], str]) -> Tensor:
        order = [query, *(m for m in segments if m != query)]
        x = torch.cat([segments[m] for m in order], dim=1)
        keep = torch.cat([keeps[m].bool() for m in order], dim=1)
        route = [(expert(m), segments[m].shape[1]) for m in order]
        return norm(self._run(blocks, x, keep, route)[:, : segments[query].shape[1]])

    def fuse(self, tokens: Mapping[str, Tensor], token_mask: Mapping[str, Tensor], query: str) -> Tensor:
        """The joint pass of ``fusion_depth > 0`` on final token states ``tokens[m]`` (``[B, T_m, width]``, no
        [CLS], aligned with the inputs as ``ModelOutput.tokens``; ``token_mask[m]`` ``bool[B, T_m]``, a missing
        mask means every token is real): ``query``'s fused states ``[B, T_query, width]``, aligned with
        ``tokens[query]``. Rows of absent modalities are masked by the caller through ``token_mask``."""
        if self.fusion_depth == 0:
            raise ArchitectureError("model.unified.fusion_depth=0 fuses raw inputs inside forward (pure early "
                                    "fusion), which cannot be redone from token states; set fusion_depth >= 1 for "
                                    "objectives that call fuse")
        if query not in tokens:
            raise ArchitectureError(f"fusion query modality {query!r} is not among the tokens given ({sorted(tokens)})")
        self._check_known(tokens)
        keeps = {}
        for m, t in tokens.items():
            if t.ndim != 3 or t.shape[-1] != self.width:
                raise ArchitectureError(f"tokens of {m!r} must be [B, T, {self.width}], got {list(t.shape)}")
            mask = token_mask.get(m)
            if mask is not None and tuple(mask.shape) != tuple(t.shape[:2]):
                raise ArchitectureError(f"token_mask of {m!r} is {list(mask.shape)}, its tokens {list(t.shape[:2])}")
            keeps[m] = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if mask is None else mask.bool()
        assert self.fusion_norm is not None
        return self._joint(tokens, keeps, query, self.fusion_blocks, self.fusion_norm, lambda _: FUSION_EXPERT)

    # the model's forward ---------------------------------------------------------------------------------------
    def forward(self, inputs: Mapping[str, Any], present: Mapping[str, Tensor] | None = None) -> ModelOutput:
        encoded = self._encode(inputs)
        out = ModelOutput(embeddings={}, pooled={}, tokens={}, present={})
        for m, enc in encoded.items():
            out.tokens[m], out.token_mask[m] = enc.states[:, 1:], enc.keep[:, 1:]
            out.pooled[m] = enc.states[:, 0]
            out.embeddings[m] = self.heads[tower_name(m)](out.pooled[m])
            given = present.get(m) if present is not None else None
            out.present[m] = (given.bool() if given is not None
                              else torch.ones(enc.keep.shape[0], dtype=torch.bool, device=enc.keep.device))
        plain = [m for m in encoded if tower_name(m) == m]  # views are not fused
        q = self.query
        if q in plain and len(plain) > 1:
            if self.fusion_depth > 0:  # on the aligned token states, exactly what `fuse` does
                keeps = {m: out.token_mask[m] if m == q else out.token_mask[m] & out.present[m][:, None]
                         for m in plain}
                out.fused[q] = self.fuse({m: out.tokens[m] for m in plain}, keeps, q)
            else:  # the whole backbone over the embedded inputs, [CLS] included; the query's [CLS] is dropped
                keeps = {m: encoded[m].keep if m == q else encoded[m].keep & out.present[m][:, None] for m in plain}
                joint = self._joint({m: encoded[m].sequence for m in plain}, keeps, q, self.blocks, self.norm,
                                    lambda m: m)
                out.fused[q] = joint[:, 1:]
        return out

    def encode(self, modality: str, x: Any) -> Tensor:
        """The projected embedding of one modality."""
        return self.forward({modality: x}).embeddings[modality]

    # timm-style contract ---------------------------------------------------------------------------------------
    def forward_features(self, inputs: Mapping[str, Any]) -> dict[str, Tensor]:
        """Final states ``[B, 1+T_m, width]`` per given modality, [CLS] first as in a timm ViT (``forward``'s
        ``tokens[m]`` is ``[:, 1:]`` of it, ``pooled[m]`` its ``[:, 0]``); no head, no fusion."""
        return {m: enc.states for m, enc in self._encode(inputs).items()}

    def forward_head(self, tokens: Mapping[str, Tensor], pre_logits: bool = False) -> dict[str, Tensor]:
        """From `forward_features`' states ([CLS] first): the pooled [CLS] state ``[:, 0]`` (``pre_logits=True``,
        ``forward``'s ``pooled``) or the projected embedding, per modality."""
        self._check_known(tokens)
        pooled = {m: t[:, 0] for m, t in tokens.items()}
        return pooled if pre_logits else {m: self.heads[tower_name(m)](p) for m, p in pooled.items()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        if self.perceiver is not None:
            self.perceiver.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        names = {f"cls_tokens.{m}" for m in self.embedders} | {f"type_embeds.{m}" for m in self.embedders}
        if self.perceiver is not None:
            names.add("perceiver.latents")
        return names | {f"embedders.{m}.{n}" for m, e in self.embedders.items() for n in e.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm layer groups: the stem (tokenisers, [CLS]/type embeddings, Perceiver), backbone blocks by index
        (final norm with the last), fusion blocks by index after them; heads are left unmatched (last group).
        ``coarse`` gives the same groups (already one per block)."""
        return {
            "stem": r"^embedders\.|^cls_tokens\.|^type_embeds\.|^perceiver\.",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm\.", (99999,))],
            "fusion": [(r"^fusion_blocks\.(\d+)", None), (r"^fusion_norm\.", (99999,))],
        }


def _validate(embedders: Mapping[str, TokenEmbedder], *, width: int, depth: int, heads: int, fusion_depth: int,
              latents: int, latent_depth: int, drop_path: float, query: str,
              drop_token_rates: Mapping[str, float]) -> None:
    if not embedders:
        raise ArchitectureError("the unified model needs at least one modality embedder")
    if heads < 1 or width % heads:
        raise ArchitectureError(f"model.unified.width={width} must be divisible by model.unified.heads={heads}")
    if depth < 1:
        raise ArchitectureError(f"model.unified.depth must be >= 1, got {depth}")
    if fusion_depth < 0:
        raise ArchitectureError(f"model.unified.fusion_depth must be >= 0, got {fusion_depth}")
    if latents < 0:
        raise ArchitectureError(f"model.unified.latents must be >= 0, got {latents}")
    if latents > 0 and latent_depth < 1:
        raise ArchitectureError(f"model.unified.latent_depth must be >= 1, got {latent_depth}")
    if not 0.0 <= drop_path < 1.0:
        raise ArchitectureError(f"model.unified.drop_path must be in [0, 1), got {drop_path}")
    for m, rate in drop_token_rates.items():
        if m not in embedders:
            raise ArchitectureError(f"model.unified.drop_tokens.{m}: no such modality "
                                    f"(modalities: {sorted(embedders)})")
        if not 0.0 <= rate < 1.0:
            raise ArchitectureError(f"model.unified.drop_tokens.{m} must be in [0, 1), got {rate}")
    for m, e in embedders.items():
        if tower_name(m) != m:
            raise ArchitectureError(f"embedder key {m!r} names a view; embedders are keyed by modality")
        if int(getattr(e, "width", width)) != width:
            raise ArchitectureError(f"the {m!r} embedder is {e.width} wide but model.unified.width={width}")
    if len(embedders) > 1 and query not in embedders:
        raise ArchitectureError(f"model.unified.query={query!r} names no modality (modalities: {sorted(embedders)})")

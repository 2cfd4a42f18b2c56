"""A frozen vision tower and a frozen language model stitched by a small trainable bridge.

Frozen (Tsimpoukelli et al. 2021), ClipCap (Mokady et al. 2021), BLIP-2 (Li et al. 2023), Flamingo (Alayrac et
al. 2022), LiMBeR (Merullo et al. 2023): only the bridge and two projection heads train; the vision tower and the
LM are frozen (``requires_grad`` off) and stay in eval mode whatever ``train()`` is asked (no dropout, BatchNorm
statistics fixed).

``forward({"image": [B, C, H, W], "text": {"input_ids", "attention_mask"}}, present)`` returns a `ModelOutput`:

* image (from the bridge output ``Z = bridge(V, p)``, ``V``/``p`` the frozen tower's tokens / pooled feature):
  ``tokens = Z`` ``[B, n, w]``, ``pooled = mean_i Z_i``, ``embeddings = head_image(pooled)``;
* text (the frozen LM on the text alone, states ``H``): ``tokens = H``, ``pooled = Σ_t m_t H_t / Σ_t m_t``,
  ``embeddings = head_text(pooled)``;
* ``fused["text"]`` ``[B, L, d]`` (both modalities given): the LM's states over the text positions when conditioned
  on the image — soft prompts ``P`` prepended to the token embeddings (``LM([P; E(x)])[:, k:]``), or, for
  Flamingo, the text alone with the gated cross-attention blocks reading ``Z`` before the hooked layers;
* ``fusion_inputs``: ``E(x)`` for the text and ``P`` for the image, what `fuse` conditions the LM on for any
  other pairing of rows (matching's negatives), and ``fused_summary`` the position a matching head reads (a causal
  LM's last real token).

A modality not given costs nothing (ImageBind style): an image-only batch never runs the LM, a text-only batch
never runs the vision tower. ``lm_logits`` exposes the LM's own (frozen) output head when the LM is causal, for
the captioning objective.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.fusion_free import as_tokens
from mmssl.architectures.heads import ProjectionHead
from mmssl.architectures.masked_views import MaskedViews
from mmssl.architectures.outputs import ModelOutput, ModelSpec
from mmssl.architectures.stitching.bridges import Bridge, BridgeOutput
from mmssl.architectures.stitching.flamingo import FlamingoBridge
from mmssl.architectures.stitching.lm import FrozenLM
from mmssl.architectures.towers import Tower


class StitchedModel(MaskedViews, nn.Module):
    """See the module docstring.

    Args:
        vision: the frozen vision tower (e.g. ``TimmTower("efficientnet_lite0", pretrained=...)``); frozen here.
        lm: the frozen language model.
        bridge: the trainable bridge (``bridge.vision_dim == vision.num_features``, ``bridge.lm_dim == d``).
        embed_dim: width of the shared embedding space of the two heads.
        head: ``linear`` or ``mlp`` projection heads (`architectures.heads.ProjectionHead`).
        special_tokens / vocab_size: the LM tokenizer's facts (``{"pad": .., "bos": ..}``; vocabulary size,
            default the LM's), reported in `model_spec`.
        vision_weights: the local weight file the vision tower was loaded from (for `frozen_sources`; default the
            tower's own ``source`` where it records one).
        fuse_text: compute ``fused["text"]`` (off for contrastive-only training, e.g. BLIP-2 stage 1, to save the
            conditioned LM pass).
    """

    family = "stitched"

    def __init__(self, vision: Tower, lm: FrozenLM, bridge: Bridge, *, embed_dim: int, head: str = "linear",
                 special_tokens: Mapping[str, int] | None = None, vocab_size: int | None = None,
                 vision_weights: str | None = None, fuse_text: bool = True, image_key: str = "image",
                 text_key: str = "text") -> None:
        super().__init__()
        if bridge.vision_dim != vision.num_features:
            raise ArchitectureError(f"model.stitched.bridge was built for vision width {bridge.vision_dim}, "
                                    f"but the vision tower gives {vision.num_features}")
        if bridge.lm_dim != lm.hidden_size:
            raise ArchitectureError(f"model.stitched.bridge was built for LM width {bridge.lm_dim}, "
                                    f"but the LM's hidden size is {lm.hidden_size}")
        if embed_dim < 1:
            raise ArchitectureError(f"model.embed_dim must be >= 1, got {embed_dim}")
        self.vision = vision.requires_grad_(False)
        self.lm = lm
        self.bridge = bridge
        self.image_key, self.text_key = image_key, text_key
        self.heads = nn.ModuleDict({image_key: ProjectionHead(bridge.width, embed_dim, head),
                                    text_key: ProjectionHead(lm.hidden_size, embed_dim, head)})
        self.embed_dim = embed_dim
        self.special_tokens = dict(special_tokens or {})
        self.vocab_size = int(vocab_size if vocab_size is not None else lm.vocab_size)
        self.vision_weights = vision_weights or getattr(vision, "source", None)
        self.fuse_text = fuse_text
        if isinstance(bridge, FlamingoBridge):
            bridge.attach(lm.layers())
        self.spec: ModelSpec | None = None  # set by whoever builds the model (see `model_spec`)
        self.train()

    @property
    def modalities(self) -> list[str]:
        return [self.image_key, self.text_key]

    @property
    def has_lm_head(self) -> bool:
        return self.lm.causal

    def train(self, mode: bool = True) -> StitchedModel:
        super().train(mode)
        self.vision.eval()
        self.lm.eval()
        return self

    # forward -----------------------------------------------------------------------------------------------------
    def forward(self, inputs: Mapping[str, Any], present: Mapping[str, Tensor] | None = None) -> ModelOutput:
        unknown = sorted(m for m in inputs if m not in self.modalities)
        if unknown:
            raise ArchitectureError(f"the stitched model has no tower for modality {unknown[0]!r} "
                                    f"(towers: {self.modalities})")
        out = ModelOutput(embeddings={}, pooled={}, tokens={}, present={})
        bridged: BridgeOutput | None = None
        if self.image_key in inputs:
            bridged = self.encode_image(inputs[self.image_key])
            pooled = bridged.tokens.mean(1)
            self._record(out, self.image_key, bridged.tokens, pooled, None, present)
        if self.text_key in inputs:
            text = inputs[self.text_key]
            ids, mask = text["input_ids"], text["attention_mask"]
            embeds = self.lm.embed(ids)
            hidden = self.lm(embeds, mask)
            self._record(out, self.text_key, hidden, self.lm.mean_pool(hidden, mask), mask.bool(), present)
            out.fusion_inputs[self.text_key] = embeds
            if bridged is not None and self.fuse_text:
                out.fused[self.text_key] = self.condition(bridged, embeds, mask)
        if bridged is not None and bridged.prompts is not None:
            out.fusion_inputs[self.image_key] = bridged.prompts
            out.fusion_mask[self.image_key] = torch.ones(bridged.prompts.shape[:2], dtype=torch.bool,
                                                         device=bridged.prompts.device)
        return out

    def _record(self, out: ModelOutput, m: str, tokens: Tensor, pooled: Tensor, token_mask: Tensor | None,
                present: Mapping[str, Tensor] | None) -> None:
        out.tokens[m], out.pooled[m] = tokens, pooled
        out.embeddings[m] = self.heads[m](pooled)
        ones = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        out.token_mask[m] = token_mask if token_mask is not None else ones
        given = present.get(m) if present is not None else None
        out.present[m] = given if given is not None else ones[:, 0]

    def encode_image(self, image: Tensor) -> BridgeOutput:
        """The frozen tower, then the bridge."""
        features, pooled = self.vision(image)
        return self.bridge(as_tokens(features), pooled)

    def condition(self, bridged: BridgeOutput, text_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """``[B, L, d]`` LM states over the text positions, conditioned on the image (module docstring)."""
        if bridged.prompts is None and not isinstance(self.bridge, FlamingoBridge):
            raise ArchitectureError(f"bridge {type(self.bridge).__name__} gave no soft prompts")
        image = bridged.tokens if bridged.prompts is None else bridged.prompts
        return self._conditioned(image, None, text_embeds, attention_mask)

    def _conditioned(self, image: Tensor, image_mask: Tensor | None, text_embeds: Tensor,
                     attention_mask: Tensor) -> Tensor:
        if isinstance(self.bridge, FlamingoBridge):  # image: the resampled tokens Z the xattn blocks read
            with self.bridge.conditioning(image):
                return self.lm(text_embeds, attention_mask)
        prompts = image.to(text_embeds.dtype)  # image: soft prompts P in the LM's input space
        k = prompts.shape[1]
        if image_mask is None:
            image_mask = torch.ones(prompts.shape[:2], dtype=torch.bool, device=attention_mask.device)
        hidden = self.lm(torch.cat([prompts, text_embeds], dim=1),
                         torch.cat([image_mask.to(attention_mask.dtype), attention_mask], dim=1))
        return hidden[:, k:]

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """``[..., d] -> [..., V]`` through the frozen LM's own output head (causal LMs)."""
        return self.lm.lm_logits(hidden)

    def fuse(self, tokens: Mapping[str, Tensor], token_mask: Mapping[str, Tensor], query: str) -> Tensor:
        """``[B, L, d]``: the LM's states over the text conditioned on the image, from the fusion inputs the
        forward gives (``fusion_inputs``): ``tokens[text]`` the text's input embeddings ``E(x)``,
        ``tokens[image]`` the soft prompts ``P`` (Flamingo: the bridge tokens ``Z``), so
        ``fuse(P, E(x)) = LM([P; E(x)])[:, k:]`` — `condition` on other rows' pairs (ITM negatives)."""
        if query != self.text_key or set(tokens) != {self.text_key, self.image_key}:
            raise ArchitectureError(f"the stitched model fuses query {self.text_key!r} with context "
                                    f"{self.image_key!r}; got query {query!r} over {sorted(tokens)}")
        text_mask = token_mask.get(self.text_key)
        if text_mask is None:
            raise ArchitectureError(f"fuse needs the {self.text_key!r} attention mask")
        return self._conditioned(tokens[self.image_key], token_mask.get(self.image_key), tokens[self.text_key],
                                 text_mask.long())

    def fused_summary(self, fused: Tensor, query_mask: Tensor) -> Tensor:
        """``[B, d]``: the state a matching head reads. A causal LM's last real text token (the only one that has
        attended to the image and the whole text); an encoder LM's first token (its CLS)."""
        if not self.lm.causal:
            return fused[:, 0]
        positions = torch.arange(query_mask.shape[1], device=query_mask.device)
        last = (positions * query_mask.long()).amax(1)  # right- or left-padded alike; an all-pad row reads 0
        return fused[torch.arange(fused.shape[0], device=fused.device), last]

    def encode(self, modality: str, x: Any) -> Tensor:
        """The projected embedding of one modality."""
        return self.forward({modality: x}).embeddings[modality]

    # facts ---------------------------------------------------------------------------------------------------------
    def model_spec(self) -> ModelSpec:
        """The spec objectives size themselves from: ``fusion_dim`` is the LM width (``fused["text"]``)."""
        special = {self.text_key: dict(self.special_tokens)} if self.special_tokens else {}
        return ModelSpec(family=self.family, modalities=(self.image_key, self.text_key), embed_dim=self.embed_dim,
                         feature_dims={self.image_key: self.bridge.width, self.text_key: self.lm.hidden_size},
                         token_dims={self.image_key: self.bridge.width, self.text_key: self.lm.hidden_size},
                         fusion_dim=self.lm.hidden_size, vocab_sizes={self.text_key: self.vocab_size},
                         special_tokens=special)

    def frozen_sources(self) -> dict[str, str]:
        """Module prefix -> the local weight file its (frozen) parameters and buffers were loaded from, so a
        checkpoint may store ``path + sha256`` instead of them. Parts built from a config are absent."""
        sources = {}
        if self.vision_weights:
            sources["vision"] = str(self.vision_weights)
        if self.lm.weights_file:
            sources["lm"] = str(self.lm.weights_file)
        return sources

    # timm-style contract -----------------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoints the bridge's layer stack. The frozen towers need no gradient of their own, and the frozen
        LM runs in eval mode, where transformers does not checkpoint."""
        self.bridge.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {f"bridge.{n}" for n in self.bridge.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^vision\.|^lm\.",
                "blocks": [(r"^bridge\.(?:layers|resampler\.layers|xattn)\.(\d+)", None),
                           (r"^bridge\.|^heads\.", (99999,))]}

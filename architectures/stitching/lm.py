"""A frozen transformers language model behind the few calls a stitched model makes.

``FrozenLM`` wraps an encoder (BERT-style, e.g. all-MiniLM-L6-v2) or a causal LM (GPT-2, Llama-style) and exposes:

* ``embed(input_ids) -> [B, L, d]``: the model's own input (token) embeddings; soft prompts live in this space;
* ``forward(inputs_embeds, attention_mask) -> [B, S, d]``: the backbone's last hidden states (after its final norm,
  where it has one) for a sequence given as embeddings (the backbone adds its positions itself);
* ``lm_logits(hidden) -> [..., V]`` (causal LMs): the model's own output head, ``W_out h``;
* ``layers()``: the backbone's ModuleList of transformer layers (BERT ``encoder.layer``, GPT-2 ``h``, Llama-style
  ``layers`` / ``model.layers``), where Flamingo's gated cross-attention hooks in;
* ``mean_pool(hidden, mask)``: the mean of real tokens' states (sentence-transformers' pooling).

Every parameter is frozen (``requires_grad`` off) and the module stays in eval mode whatever ``train()`` is asked
(no dropout). In eval mode transformers does not checkpoint activations, so the frozen LM is never checkpointed.
Weights come from a local directory (``model.safetensors`` + ``config.json``) or a config; never from a hub.
Every submodule is called through its own ``__call__``, so ZeRO-3's parameter-gathering hooks fire.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmssl.architectures.errors import ArchitectureError

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
LAYER_PATHS = ("encoder.layer", "h", "layers", "model.layers", "decoder.layers", "transformer.h")


def _find_module(root: nn.Module, dotted: str) -> nn.Module | None:
    module: Any = root
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _build(factory: Any, source: Any, causal: bool, **kwargs: Any) -> nn.Module:
    if causal:
        return factory(source, **kwargs)
    try:  # BERT family: no pooler (unused parameters, and pooling is ours)
        return factory(source, add_pooling_layer=False, **kwargs)
    except TypeError:
        return factory(source, **kwargs)


class FrozenLM(nn.Module):
    """See the module docstring. ``weights_file`` is the local file the weights were read from (None when built
    from a config), for the path + sha256 reference a checkpoint stores instead of the frozen weights."""

    def __init__(self, model: nn.Module, *, causal: bool, weights_file: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.causal = causal
        self.weights_file = weights_file
        config = model.config
        self.hidden_size = int(config.hidden_size)
        self.vocab_size = int(config.vocab_size)
        if causal and self.model.get_output_embeddings() is None:
            raise ArchitectureError(f"causal LM {type(model).__name__} has no output head (get_output_embeddings)")
        self.model.requires_grad_(False)
        self.model.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, *, causal: bool | None = None,
                        dtype: torch.dtype = torch.float32) -> FrozenLM:
        """Load from a local directory holding ``config.json`` and ``model.safetensors`` (only safetensors is
        read), in ``dtype`` (a bf16 run's frozen LM is read straight into bf16). ``causal=None`` infers it from
        the config's ``architectures`` (``*ForCausalLM`` / ``*LMHeadModel``)."""
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        p = Path(path)
        if not (p / "config.json").is_file():
            raise ArchitectureError(f"no transformers model at {p} (config.json missing)")
        weights = p / "model.safetensors"
        if not weights.is_file():
            raise ArchitectureError(f"no model.safetensors in {p} (mmssl only reads safetensors weights)")
        config = AutoConfig.from_pretrained(str(p), local_files_only=True)
        if causal is None:
            causal = any(a.endswith(CAUSAL_SUFFIXES) for a in (config.architectures or []))
        factory = AutoModelForCausalLM if causal else AutoModel
        if torch.empty(0).device.type == "meta":  # a shape-only build (recipe validation) reads no weights
            model = _build(factory.from_config, config, causal)
        else:
            model = _build(factory.from_pretrained, str(p), causal, config=config, local_files_only=True,
                           use_safetensors=True, dtype=dtype)
        return cls(model, causal=causal, weights_file=str(weights.resolve()))

    @classmethod
    def from_config(cls, config: Any, *, causal: bool) -> FrozenLM:
        """A randomly initialised model of ``config`` (a transformers ``PretrainedConfig``), for tests and
        ablations."""
        from transformers import AutoModel, AutoModelForCausalLM

        factory = AutoModelForCausalLM if causal else AutoModel
        return cls(_build(factory.from_config, config, causal), causal=causal)

    @property
    def backbone(self) -> nn.Module:
        """The model without its output head (``base_model``: GPT-2's ``transformer``, Llama's ``model``)."""
        return self.model.base_model

    def train(self, mode: bool = True) -> FrozenLM:
        return super().train(False)

    def layers(self) -> nn.ModuleList:
        for dotted in LAYER_PATHS:
            found = _find_module(self.backbone, dotted)
            if isinstance(found, nn.ModuleList) and len(found):
                return found
        raise ArchitectureError(f"cannot find the transformer layers of {type(self.model).__name__} "
                                f"(looked for {', '.join(LAYER_PATHS)})")

    def embed(self, input_ids: Tensor) -> Tensor:
        """``[B, L] -> [B, L, d]`` token embeddings (positions are added by the backbone in ``forward``)."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """Last hidden states ``[B, S, d]`` of the backbone over ``inputs_embeds`` (``attention_mask``: 1 = real)."""
        out = self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(), use_cache=False)
        return out.last_hidden_state

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """``[..., d] -> [..., V]`` through the model's own output head (causal LMs only)."""
        if not self.causal:
            raise ArchitectureError(f"{type(self.model).__name__} is not a causal LM: it has no output head to "
                                    "give token logits (load a *ForCausalLM model for captioning)")
        return self.model.get_output_embeddings()(hidden)

    @staticmethod
    def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """``Σ_t m_t h_t / max(1, Σ_t m_t)`` over real tokens."""
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def text_states(self, text: dict[str, Tensor]) -> Tensor:
        """Hidden states of the text alone (``{"input_ids", "attention_mask"}``)."""
        return self(self.embed(text["input_ids"]), text["attention_mask"])

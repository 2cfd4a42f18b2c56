"""Text: a tokenizer (sentencepiece or Hugging Face) and a transformers encoder built by config.

The tower is ``AutoModel.from_config(AutoConfig.for_model(arch, ...))`` (a BERT-style encoder by default; the
arch's own size unless the recipe sets size keys), randomly initialised, or ``AutoModel.from_pretrained(pretrained)``
from a local directory or a Hugging Face id in the local cache, loaded strictly (`architectures.towers`).
``vocab_size`` and ``pad_token_id`` come from the tokenizer; ``max_position_embeddings`` from ``max_len``.
``arch: clip`` builds CLIP's text transformer (Radford et al. 2021; transformers' ``CLIPTextModel`` from
`clip_text_config`): causal, pooled at the end-of-text token (``pool: eot``), CLIP's initialisation.

Token embedder: `TokenIdEmbedder` (an id lookup plus a learned position). Masking selects, per row,
``max(1, ⌊ratio·n + ½⌋)`` of the ``n`` real tokens that are not special ids (pad / bos / eos / mask), uniformly:
BERT's selection (Devlin et al. 2019; the 80/10/10 replacement is the objective's job). Target: the ids ``[B, L]``.

Corruptions (robustness evaluation, `TextPlugin.corrupted_decoder`), applied to the decoded, stripped string before
tokenisation, at ``level ∈ [0, 1]``:

* ``token_drop``: each whitespace-separated word is dropped with probability ``level``;
* ``typos``: each letter or digit gets, with probability ``level``, a keyboard typo (a QWERTY-neighbour substitution,
  a swap with the next character, or a deletion; Belinkov & Bisk 2018; the neighbour map is
  `corruptions.keyboard_neighbours`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmssl.architectures.checkpoints import resolve_pretrained
from mmssl.architectures.embedders import TokenIdEmbedder
from mmssl.architectures.modalities import corruptions
from mmssl.architectures.modalities.base import DecoderFn, ModalityPlugin, TowerConfig, hf_sizes, path_field
from mmssl.architectures.modalities.masking import Generators, random_token_mask
from mmssl.architectures.modalities.tokenizers import Tokenizer, load_tokenizer
from mmssl.architectures.towers import ArchitectureError, HFTextTower


@dataclass
class TextConfig(TowerConfig):
    arch: str = "bert"
    pool: str | None = None  # cls | mean | eot; None: eot for a causal tower (arch: clip), cls otherwise
    tokenizer: str | None = path_field(help="sentencepiece .model, tokenizer.json, or a directory with one")
    max_len: int = 32


TextCorruption = Callable[[str, np.random.Generator], str]
CLIP_ARCHS = ("clip", "clip_text_model")  # model.text.arch names of CLIP's text transformer


def clip_text_config(cfg: TextConfig, tok: Tokenizer) -> Any:
    """transformers' ``CLIPTextConfig`` for CLIP's text transformer (Radford et al. 2021) at the recipe's size (the
    size keys it sets, `hf_sizes`; CLIPTextConfig's own for the rest): pre-norm
    causal blocks, GELU MLPs (open_clip's default activation), a final LayerNorm, CLIP's initialisation
    (``CLIPPreTrainedModel._init_weights``), the tokenizer's vocabulary and special ids; ``model_args`` overrides
    any field (``hidden_act: quick_gelu`` for OpenAI's checkpoints)."""
    from transformers import CLIPTextConfig

    specials = tok.special_ids()
    if "eos" not in specials:
        raise ArchitectureError(f"model.text.arch={cfg.arch!r} pools at the end-of-text token, but the tokenizer "
                                f"{cfg.tokenizer} appends none (special ids: {specials})")
    fields = {"vocab_size": tok.vocab_size, "max_position_embeddings": cfg.max_len,
              "hidden_act": "gelu", "attention_dropout": cfg.dropout, "pad_token_id": tok.pad_id,
              "bos_token_id": specials.get("bos", specials["eos"]), "eos_token_id": specials["eos"]}
    sizes = hf_sizes(cfg, CLIPTextConfig().hidden_size)
    return CLIPTextConfig(**{**fields, **sizes, **cfg.model_args})


class TextDecoder:
    """UTF-8 bytes -> token ids; ``corrupt`` (evaluation corruptions) acts on the stripped string."""

    def __init__(self, tokenizer: Tokenizer, corrupt: TextCorruption | None = None) -> None:
        self.tokenizer = tokenizer
        self.corrupt = corrupt

    def __call__(self, data: bytes, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        text = data.decode("utf-8").strip()
        if self.corrupt is not None:
            text = self.corrupt(text, rng)
        return self.tokenizer.encode(text)


class TextPlugin(ModalityPlugin):
    name = "text"
    config_cls = TextConfig
    extensions = ("txt", "text", "caption")
    corruptions = ("token_drop", "typos")

    def __init__(self) -> None:
        self._special: dict[tuple[str, int, float], tuple[int, ...]] = {}

    def tokenizer(self, cfg: TextConfig) -> Tokenizer:
        source = cfg.tokenizer or (str(resolve_pretrained(cfg.pretrained, "model.text.pretrained"))
                                   if cfg.pretrained else None)
        if not source:
            raise ArchitectureError("model.text.tokenizer is not set (a sentencepiece .model or a tokenizer.json)")
        return load_tokenizer(source, cfg.max_len)

    def special_ids(self, cfg: TextConfig) -> tuple[int, ...]:
        """The tokenizer's special ids (``Tokenizer.special_ids`` values), cached per tokenizer file version."""
        source = str(cfg.tokenizer or cfg.pretrained or "")
        path = Path(source)
        stamp = path.stat().st_mtime if path.exists() else 0.0
        key = (source, cfg.max_len, stamp)
        if key not in self._special:
            self._special[key] = tuple(sorted(set(self.tokenizer(cfg).special_ids().values())))
        return self._special[key]

    def decoder(self, cfg: TextConfig, *, train: bool) -> DecoderFn:
        return TextDecoder(self.tokenizer(cfg))

    def build_corrupted_decoder(self, cfg: TextConfig, kind: str, level: float) -> TextDecoder:
        """The evaluation decoder with ``kind`` at ``level`` applied to the raw string (module docstring)."""
        fn = corruptions.drop_words if kind == "token_drop" else corruptions.keyboard_typos
        return TextDecoder(self.tokenizer(cfg), corrupt=corruptions.Bound(fn, level))

    def build_tower(self, cfg: TextConfig) -> HFTextTower:
        """A pretrained tower is its checkpoint's size unless the recipe sets size keys or ``model_args`` (the
        checkpoint must then fit them, `pretrained_strict`); a new one is ``arch``'s transformers config with the
        size keys set (`hf_sizes`), ``model_args`` over all."""
        from transformers import AutoConfig

        if cfg.pretrained:
            config = None
            if cfg.model_args or any(getattr(cfg, k) is not None for k in ("width", "depth", "heads", "mlp_ratio")):
                path = resolve_pretrained(cfg.pretrained, "model.text.pretrained")
                config = AutoConfig.from_pretrained(str(path), local_files_only=True)
                for key, value in {**hf_sizes(cfg, config.hidden_size), **cfg.model_args}.items():
                    setattr(config, key, value)
            return HFTextTower(config=config, pretrained=cfg.pretrained, pool=cfg.pool, strict=cfg.pretrained_strict)
        tok = self.tokenizer(cfg)
        if cfg.arch in CLIP_ARCHS:
            return HFTextTower(config=clip_text_config(cfg, tok), pool=cfg.pool)
        fields = {"vocab_size": tok.vocab_size, "max_position_embeddings": cfg.max_len,
                  "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
                  "pad_token_id": tok.pad_id}
        try:
            hidden = AutoConfig.for_model(cfg.arch).hidden_size if cfg.width is None else None
            hf_config = AutoConfig.for_model(cfg.arch, **{**fields, **hf_sizes(cfg, hidden), **cfg.model_args})
        except ValueError as exc:
            raise ArchitectureError(f"model.text.arch={cfg.arch!r}: {exc}") from None
        return HFTextTower(config=hf_config, pool=cfg.pool)

    def build_embedder(self, cfg: TextConfig, width: int) -> TokenIdEmbedder:
        tok = self.tokenizer(cfg)
        return TokenIdEmbedder(tok.vocab_size, cfg.max_len, width, pad_id=tok.pad_id)

    def mask_kinds(self, cfg: TextConfig) -> tuple[str, ...]:
        return ("random",)

    def mask(self, cfg: TextConfig, x: dict[str, Tensor], ratio: float, generator: Generators = None, *,
             kind: str | None = None, span_length: int = 1) -> Tensor:
        """``random``: BERT's selection over real, non-special tokens (module docstring); ``bool[B, L]``."""
        self.check_mask_kind(cfg, kind)
        ids = x["input_ids"]
        specials = torch.tensor(self.special_ids(cfg), dtype=ids.dtype, device=ids.device)
        maskable = x["attention_mask"].bool() & ~torch.isin(ids, specials)
        return random_token_mask(ids.shape[0], ids.shape[1], ratio, generator, maskable=maskable, min_count=1,
                                 device=ids.device)

    def target(self, cfg: TextConfig, x: dict[str, Tensor]) -> Tensor:
        """The token ids ``[B, L]``."""
        return x["input_ids"]

    def export_assets(self, cfg: TextConfig, out_dir: Path) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer(cfg).save(out_dir)}

    def random_example(self, cfg: TextConfig, batch_size: int) -> dict[str, torch.Tensor]:
        vocab = self.tokenizer(cfg).vocab_size
        ids = torch.randint(4, vocab, (batch_size, cfg.max_len))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

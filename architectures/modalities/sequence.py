"""Generic sequences: time series, sensor channels and tabular rows -> tokens -> a transformers encoder.

Decoding (per sample): a ``.npy`` float array ``[T, C]`` (time steps x channels) or ``[C]`` (one tabular row; a
univariate series ``[T]`` when ``layout="time"`` and ``channels=1``), or ``.csv`` / ``.tsv`` text (one row per time
step, numeric columns, an optional header row, empty fields missing). With per-channel ``mean``/``std`` from the
config, ``x' = (x - mean_c) / std_c``; missing values (NaN) become 0 after it (the channel mean). Then:

* ``layout="time"``: crop ``length`` steps (at a random offset from the per-sample generator when training, from
  the start otherwise) or zero-pad to ``length``; ``mask[t]`` is True for real steps. Tokens: non-overlapping patches
  of ``patch_len`` steps x ``C`` channels, flattened (steps, channels last) and linearly projected (PatchTST, Nie et
  al. 2023): ``token_n = W·vec(x[nP:(n+1)P, :]) + b``; a token is real if any of its steps is.
* ``layout="features"``: one row, one token per column (FT-Transformer's feature tokenizer, Gorishniy et al. 2021):
  ``token_j = x_j·w_j + b_j`` (``w_j, b_j ∈ R^width``).

Decoded value: ``{"values": float [L, C], "mask": bool [L]}`` (``L = length``, or 1 for a tabular row).

Tower (`SequenceTower`): a transformers encoder built by config (``AutoConfig.for_model(arch)``, BERT by default,
with a one-entry vocabulary since ids are never read) fed ``inputs_embeds = [CLS; tokens]`` with attention mask
``[1; token mask]``; pooled output: the CLS state (``pool="cls"``) or the mean over real tokens (``pool="mean"``).
Token embedder (`SequenceEmbedder`): the same tokenizer plus a learned position. Masking: ``random``,
``⌊ratio·n + ½⌋`` of a row's ``n`` real tokens, uniformly; ``span`` (``layout: time``), wav2vec 2.0 / HuBERT spans
of ``span_length`` patches over time, ``max(1, ⌊p·n + ½⌋)`` starts within the real tokens. Target: the token's values
(``[B, T, P·C]`` patches, ``[B, C, 1]`` features).

Masked view (`SequenceTower`, the towers' masked-forward contract, `Tower.forward`): masked value tokens are replaced
by the mask token before [CLS] is prepended (replace mode), or dropped (drop mode: each row's unmasked tokens, in
order, keep their own position ids, ``1 + n`` for token ``n``; a row with fewer than ``visible`` of them fills the
rest with slots the attention mask hides, so rows of different real lengths drop together).

Corruptions (robustness evaluation, `SequencePlugin.corrupted_decoder`), applied to the normalised real steps after
cropping, before zero-padding, at ``level ∈ [0, 1]``:

* ``gaps``: ``⌊level·n⌉`` of the ``n`` real time steps (all channels), or of the ``C`` columns of a tabular row,
  chosen at random, are set to 0, the value the decoder gives a missing entry (the channel mean); ``mask`` is
  unchanged, as for values missing in the data;
* ``noise``: Gaussian noise of std ``level·σ_c`` per channel, ``σ_c`` the channel's standard deviation over the
  sample's real steps (for a tabular row: ``σ_c = 1``, one configured std).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmssl.architectures.embedders import EmbeddedTokens, TokenEmbedder, learned_positions
from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.modalities import corruptions
from mmssl.architectures.modalities.base import DecoderFn, MaskedView, ModalityPlugin, TowerConfig, hf_sizes
from mmssl.architectures.modalities.masking import Generators, random_token_mask, span_mask
from mmssl.architectures.towers import HFTextTower, Tower, TowerOutput

LAYOUTS = ("time", "features")
INPUT_FILE = "input_embedding.safetensors"
NPY_MAGIC = b"\x93NUMPY"


@dataclass
class SequenceConfig(TowerConfig):
    arch: str = "bert"
    pool: str = "cls"
    channels: int = 1
    length: int = 64
    layout: str = "time"
    patch_len: int = 8
    mean: list[float] = field(default_factory=list)  # per channel (or one for all); empty: no normalisation
    std: list[float] = field(default_factory=list)


def check_config(cfg: SequenceConfig) -> None:
    if cfg.layout not in LAYOUTS:
        raise ArchitectureError(f"model.sequence.layout must be one of {LAYOUTS}, got {cfg.layout!r}")
    if cfg.channels < 1:
        raise ArchitectureError(f"model.sequence.channels must be >= 1, got {cfg.channels}")
    if cfg.layout == "time" and (cfg.patch_len < 1 or cfg.length < 1 or cfg.length % cfg.patch_len):
        raise ArchitectureError(f"model.sequence.length={cfg.length} must be a positive multiple of "
                                f"model.sequence.patch_len={cfg.patch_len}")
    for key in ("mean", "std"):
        if len(getattr(cfg, key)) not in (0, 1, cfg.channels):
            raise ArchitectureError(f"model.sequence.{key} needs 1 or channels={cfg.channels} values, "
                                    f"got {getattr(cfg, key)}")


def num_tokens(cfg: SequenceConfig) -> int:
    return cfg.length // cfg.patch_len if cfg.layout == "time" else cfg.channels


def read_table(data: bytes) -> np.ndarray:
    """A ``.npy`` array (1-D or 2-D) or CSV/TSV text as float64 ``[rows, columns]`` (module docstring)."""
    if data[: len(NPY_MAGIC)] == NPY_MAGIC:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"a sequence array must be numeric [T, C] or [C], got {arr.dtype} {list(arr.shape)}")
        return arr.astype(np.float64)
    text = data.decode("utf-8-sig")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ValueError("empty sequence table")
    delimiter = "\t" if "\t" in lines[0] else ","
    rows = [[f.strip() for f in r] for r in csv.reader(lines, delimiter=delimiter)]

    def number(f: str) -> float:
        return float(f) if f else math.nan

    try:
        [number(f) for f in rows[0]]
    except ValueError:
        rows = rows[1:]  # a header row
    if not rows or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("sequence table rows must all have the same number of columns")
    return np.asarray([[number(f) for f in r] for r in rows], dtype=np.float64)


StepCorruption = Callable[[Tensor, np.random.Generator], Tensor]


class SequenceDecoder:
    """Bytes -> ``{"values", "mask"}``; ``corrupt`` (evaluation corruptions) acts on the normalised real steps
    ``[n, C]`` (float64) before padding."""

    def __init__(self, cfg: SequenceConfig, train: bool, corrupt: StepCorruption | None = None) -> None:
        check_config(cfg)
        self.cfg, self.train, self.corrupt = cfg, train, corrupt
        c = cfg.channels
        self.mean = np.asarray((cfg.mean * c)[:c] if cfg.mean else [0.0] * c, dtype=np.float64)
        self.std = np.asarray((cfg.std * c)[:c] if cfg.std else [1.0] * c, dtype=np.float64)

    def steps(self, data: bytes) -> np.ndarray:
        """The sample as normalised ``[T, C]`` steps, before cropping."""
        cfg = self.cfg
        arr = read_table(data)
        if arr.ndim == 1:
            arr = arr[:, None] if cfg.layout == "time" and cfg.channels == 1 else arr[None, :]
        if arr.shape[1] != cfg.channels:
            raise ArchitectureError(f"sequence sample has {arr.shape[1]} channels; "
                                    f"model.sequence.channels={cfg.channels}")
        return np.nan_to_num((arr - self.mean) / self.std, nan=0.0)

    def __call__(self, data: bytes, rng: np.random.Generator) -> dict[str, Tensor]:
        cfg = self.cfg
        x = self.steps(data)
        if cfg.layout == "features":
            if x.shape[0] != 1:
                raise ArchitectureError(f"model.sequence.layout='features' reads one tabular row per sample, "
                                        f"got {x.shape[0]} rows")
            if self.corrupt is not None:
                x = self.corrupt(torch.from_numpy(x), rng).numpy()
            return {"values": torch.from_numpy(x).float(), "mask": torch.ones(1, dtype=torch.bool)}
        n = x.shape[0]
        if n > cfg.length:
            start = int(rng.integers(0, n - cfg.length + 1)) if self.train else 0
            x, n = x[start : start + cfg.length], cfg.length
        if self.corrupt is not None:
            x = self.corrupt(torch.from_numpy(np.ascontiguousarray(x)), rng).numpy()
        values = torch.zeros(cfg.length, cfg.channels)
        values[:n] = torch.from_numpy(np.ascontiguousarray(x)).float()
        return {"values": values, "mask": torch.arange(cfg.length) < n}


def patch_values(values: Tensor, patch_len: int) -> Tensor:
    """``[B, L, C] -> [B, L/P, P·C]``: non-overlapping patches of ``P`` steps, channels last."""
    b, length, c = values.shape
    if length % patch_len:
        raise ArchitectureError(f"sequence of {length} steps is not divisible into patches of "
                                f"model.sequence.patch_len={patch_len}")
    return values.reshape(b, length // patch_len, patch_len * c)


def token_mask(cfg: SequenceConfig, step_mask: Tensor) -> Tensor:
    """``bool[B, T]`` real tokens from the ``bool[B, L]`` real-step mask."""
    step_mask = step_mask.bool()
    if cfg.layout == "features":
        return step_mask[:, :1].expand(step_mask.shape[0], cfg.channels)
    return step_mask.reshape(step_mask.shape[0], -1, cfg.patch_len).any(-1)


class PatchTokenizer(nn.Module):
    """PatchTST patch tokens (module docstring), no positions: ``[B, L, C] -> [B, L/P, width]``."""

    def __init__(self, channels: int, patch_len: int, width: int) -> None:
        super().__init__()
        self.patch_len = patch_len
        self.proj = nn.Linear(patch_len * channels, width)

    def forward(self, values: Tensor) -> Tensor:
        return self.proj(patch_values(values, self.patch_len))


class FeatureTokenizer(nn.Module):
    """FT-Transformer feature tokens ``x_j·w_j + b_j``: ``[B, 1, C] -> [B, C, width]``; ``w, b`` uniform in
    ``±1/√width`` as in Gorishniy et al. 2021."""

    def __init__(self, features: int, width: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(width)
        self.weight = nn.Parameter(torch.empty(features, width).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(features, width).uniform_(-bound, bound))

    def forward(self, values: Tensor) -> Tensor:
        if values.shape[1] != 1:
            raise ArchitectureError(f"layout='features' takes one row per sample, got {values.shape[1]} steps")
        return values[:, 0, :, None] * self.weight + self.bias


def build_tokenizer(cfg: SequenceConfig, width: int) -> nn.Module:
    check_config(cfg)
    if cfg.layout == "features":
        return FeatureTokenizer(cfg.channels, width)
    return PatchTokenizer(cfg.channels, cfg.patch_len, width)


class SequenceEmbedder(TokenEmbedder):
    """The plug-in's tokenizer plus a learned position (``T ≤ max_tokens``); mask: `token_mask`."""

    def __init__(self, cfg: SequenceConfig, width: int) -> None:
        super().__init__()
        self.cfg, self.width, self.max_tokens = cfg, width, num_tokens(cfg)
        self.tokenizer = build_tokenizer(cfg, width)
        self.pos_embed = learned_positions(self.max_tokens, width)

    def forward(self, x: dict[str, Tensor]) -> EmbeddedTokens:
        tokens = self.tokenizer(x["values"])
        if tokens.shape[1] > self.max_tokens:
            raise ArchitectureError(f"sequence gives {tokens.shape[1]} tokens, more than the {self.max_tokens} "
                                    f"of model.sequence (length / patch_len)")
        return EmbeddedTokens(tokens + self.pos_embed[:, : tokens.shape[1]], token_mask(self.cfg, x["mask"]))


class SequenceTower(Tower):
    """Tokenizer + CLS + transformers encoder (module docstring). ``forward_features``: ``[B, 1 + T, D]``,
    CLS first. ``pretrained``: a directory with a transformers model (``config.json``); one written by
    `save_native` also restores the tokenizer and CLS token (``input_embedding.safetensors``)."""

    def __init__(self, cfg: SequenceConfig) -> None:
        super().__init__()
        check_config(cfg)
        if cfg.pool not in ("cls", "mean"):
            raise ArchitectureError(f"model.sequence.pool must be 'cls' or 'mean', got {cfg.pool!r}")
        self.cfg, self.pool = cfg, cfg.pool
        if cfg.pretrained:
            self.encoder = HFTextTower(pretrained=cfg.pretrained, strict=cfg.pretrained_strict, where="model.sequence")
        else:
            self.encoder = HFTextTower(config=_hf_config(cfg))
        width = self.num_features = self.encoder.num_features
        table = self.encoder.model.get_input_embeddings()
        if table is not None:
            table.requires_grad_(False)  # ids are never read: inputs arrive as embeddings
        self.cls_token = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, width), std=0.02))
        self.tokenizer = build_tokenizer(cfg, width)
        if cfg.pretrained and (Path(cfg.pretrained) / INPUT_FILE).is_file():
            self._load_inputs(Path(cfg.pretrained) / INPUT_FILE)

    def _input_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def _load_inputs(self, path: Path) -> None:
        state = load_file(str(path))
        expected = set(self._input_state())
        if set(state) != expected:
            raise ArchitectureError(f"{path} does not match model.sequence's input embedding (missing "
                                    f"{sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)})")
        self.load_state_dict(state, strict=False)

    def token_mask(self, x: dict[str, Tensor]) -> Tensor:
        return token_mask(self.cfg, x["mask"])

    def feature_mask(self, x: dict[str, Tensor]) -> Tensor:
        """Real tokens of ``forward_features``: the CLS token, then the value tokens with real steps."""
        real = self.token_mask(x)
        return torch.cat([torch.ones_like(real[:, :1]), real], dim=1)

    def _encode(self, tokens: Tensor, real: Tensor, positions: Tensor | None = None) -> Tensor:
        """``[CLS; tokens]`` through the encoder, attending to [CLS] and the ``real`` tokens; ``positions``: the
        encoder's position ids (default: their order)."""
        cls = self.cls_token.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        attention = torch.cat([torch.ones_like(real[:, :1]), real], dim=1).long()
        extra = {} if positions is None else {"position_ids": positions}
        out = self.encoder.model(inputs_embeds=torch.cat([cls, tokens], dim=1), attention_mask=attention, **extra)
        return out.last_hidden_state

    def forward_features(self, x: dict[str, Tensor]) -> Tensor:
        return self._encode(self.tokenizer(x["values"]), self.token_mask(x))

    def forward_head(self, x: Tensor, pre_logits: bool = True, token_mask: Tensor | None = None,
                     **kwargs: Any) -> Tensor:
        if self.pool == "cls":
            return x[:, 0]
        tokens = x[:, 1:]
        weight = (token_mask if token_mask is not None else torch.ones(tokens.shape[:2], device=x.device))
        weight = weight.to(x.dtype).unsqueeze(-1)
        return (tokens * weight).sum(1) / weight.sum(1).clamp_min(1.0)

    def forward(self, x: dict[str, Tensor], mask: Tensor | None = None, mask_token: Tensor | None = None,
                visible: int | None = None) -> TowerOutput:
        """Without ``mask``: the plain forward. With ``mask`` (``bool[B, T]`` over the value tokens): the masked
        view of the module docstring under the towers' masked-forward contract (`Tower.forward`); features
        ``[B, 1 + T or 1 + visible, D]``, [CLS] first; pooled as the plain forward, over the real tokens encoded."""
        real = self.token_mask(x)
        tokens = self.tokenizer(x["values"])
        if mask is None:
            features = self._encode(tokens, real)
            return TowerOutput(features, self.forward_head(features, token_mask=real))
        if mask.shape != real.shape:
            raise ArchitectureError(f"sequence mask shape {list(mask.shape)} does not match the {list(real.shape)} "
                                    "value tokens")
        mask = mask.bool()
        if mask_token is not None:
            tokens, positions = torch.where(mask.unsqueeze(-1), mask_token.to(tokens.dtype), tokens), None
        else:
            if visible is None:
                visible = int((~mask).sum(1).max())  # waits for the device: callers pass it
            kept = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :visible]  # unmasked first, in order
            tokens = tokens.gather(1, kept.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
            real = real.gather(1, kept) & ~mask.gather(1, kept)  # filler slots (a row with fewer kept) attend nowhere
            positions = torch.cat([torch.zeros_like(kept[:, :1]), kept + 1], dim=1) + self._position_offset()
        features = self._encode(tokens, real, positions)
        return TowerOutput(features, self.forward_head(features, token_mask=real))

    def encodes_masked_views(self) -> bool:
        return True

    def _position_offset(self) -> int:
        """The encoder's first position id: 0, or ``padding_idx + 1`` for RoBERTa-style position tables."""
        embeddings = getattr(self.encoder.model, "embeddings", None)
        if hasattr(embeddings, "create_position_ids_from_inputs_embeds"):
            return int(embeddings.padding_idx) + 1
        return 0

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^cls_token|^tokenizer\.|^encoder\.model\.embeddings",
                "blocks": [(r"^encoder\.model\.encoder\.layer\.(\d+)", None)]}

    def save_native(self, out_dir: Path, extra: dict[str, Any]) -> None:
        """The encoder via ``save_pretrained`` (``AutoModel.from_pretrained(DIR)`` rebuilds it) plus
        ``input_embedding.safetensors`` (tokenizer and CLS token)."""
        self.encoder.save_native(out_dir, extra)
        state = {k: v.detach().cpu().contiguous() for k, v in self._input_state().items()}
        save_file(state, str(Path(out_dir) / INPUT_FILE))


def _hf_config(cfg: SequenceConfig) -> Any:
    from transformers import AutoConfig

    fields = {"vocab_size": 1, "max_position_embeddings": num_tokens(cfg) + 1, "hidden_dropout_prob": cfg.dropout,
              "attention_probs_dropout_prob": cfg.dropout, "pad_token_id": 0}
    try:
        hidden = AutoConfig.for_model(cfg.arch).hidden_size if cfg.width is None else None
        return AutoConfig.for_model(cfg.arch, **{**fields, **hf_sizes(cfg, hidden), **cfg.model_args})
    except ValueError as exc:
        raise ArchitectureError(f"model.sequence.arch={cfg.arch!r}: {exc}") from None


class SequencePlugin(ModalityPlugin):
    name = "sequence"
    config_cls = SequenceConfig
    extensions = ("npy", "csv", "tsv")
    corruptions = ("gaps", "noise")

    def decoder(self, cfg: SequenceConfig, *, train: bool) -> DecoderFn:
        return SequenceDecoder(cfg, train)

    def build_corrupted_decoder(self, cfg: SequenceConfig, kind: str, level: float) -> SequenceDecoder:
        """The evaluation decoder with ``kind`` at ``level`` applied to the normalised steps (module docstring)."""
        if kind == "gaps":
            axis = 1 if cfg.layout == "features" else 0
            corrupt = corruptions.Bound(corruptions.zero_slices, level, {"axis": axis, "fill": 0.0})
        else:
            corrupt = corruptions.Bound(corruptions.add_channel_noise, level)
        return SequenceDecoder(cfg, train=False, corrupt=corrupt)

    def build_tower(self, cfg: SequenceConfig) -> SequenceTower:
        return SequenceTower(cfg)

    def build_embedder(self, cfg: SequenceConfig, width: int) -> SequenceEmbedder:
        return SequenceEmbedder(cfg, width)

    def mask_kinds(self, cfg: SequenceConfig) -> tuple[str, ...]:
        return ("random", "span") if cfg.layout == "time" else ("random",)

    def mask(self, cfg: SequenceConfig, x: dict[str, Tensor], ratio: float, generator: Generators = None, *,
             kind: str | None = None, span_length: int = 1) -> Tensor:
        """``bool[B, T]`` over each row's ``n`` real patch / feature tokens: ``random``, ``⌊ratio·n + ½⌋`` of them
        uniformly; ``span`` (``layout: time``), wav2vec 2.0's spans over time: ``max(1, ⌊ratio·n + ½⌋)`` distinct
        starts in ``[0, n - span_length]``, each masking ``span_length`` consecutive patches."""
        kind = self.check_mask_kind(cfg, kind)
        real = token_mask(cfg, x["mask"])
        if kind == "span":  # the real tokens come first: the decoder pads at the end
            return span_mask(real.shape[0], real.shape[1], start_prob=ratio, span=span_length, generator=generator,
                             lengths=real.sum(1), device=real.device)
        return random_token_mask(real.shape[0], real.shape[1], ratio, generator, maskable=real,
                                 device=real.device)

    def target(self, cfg: SequenceConfig, x: dict[str, Tensor]) -> Tensor:
        """The tokens' values: ``[B, L/P, P·C]`` patches (steps, channels last) or ``[B, C, 1]`` features."""
        if cfg.layout == "features":
            return x["values"][:, 0, :, None]
        return patch_values(x["values"], cfg.patch_len)

    def masked_view(self, cfg: SequenceConfig, tower: Tower) -> MaskedView | None:
        """`SequenceTower` encodes its ``T`` value tokens (``length / patch_len`` patches, or ``channels``)."""
        if not isinstance(tower, SequenceTower):
            return None
        return MaskedView((num_tokens(cfg),), cfg.patch_len * cfg.channels if cfg.layout == "time" else 1)

    def random_example(self, cfg: SequenceConfig, batch_size: int) -> dict[str, Tensor]:
        steps = 1 if cfg.layout == "features" else cfg.length
        return {"values": torch.randn(batch_size, steps, cfg.channels),
                "mask": torch.ones(batch_size, steps, dtype=torch.bool)}

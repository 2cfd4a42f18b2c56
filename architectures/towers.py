"""Encoder towers with timm's model contract, built from timm or transformers by name and config.

Every tower exposes ``forward_features(x)`` (token states / feature maps), ``forward_head(x, pre_logits=True)``
(the pooled feature vector, ``num_features`` wide), ``set_grad_checkpointing``, ``no_weight_decay`` and
``group_matcher``, so fine-tuning tools treat all modalities alike. ``save_native`` writes the tower in its own
library's format (``model.safetensors`` + ``config.json``) so that ``timm.create_model("local-dir:DIR")`` or
``transformers.AutoModel.from_pretrained(DIR)`` rebuilds exactly the same network, with no mmssl code.

The arch name defines a tower: size keys reach the library only when a recipe sets them (`modalities.base`).
Pretrained weights are only ever read from local files: a ``.safetensors`` file, a directory written by
``save_native``/``save_pretrained`` (or timm's / transformers' hub layout), or a Hugging Face id found in the local
cache (`architectures.checkpoints`); nothing is downloaded. Loading is strict: a tensor the file lacks, a file tensor
the tower has no place for, or a shape that differs is an error naming the keys and the file, unless the recipe
opts in to a partial load (``pretrained_strict: false``). A timm classifier in the file (``pretrained_cfg``'s
``classifier``) is left out: towers have none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmssl.architectures.checkpoints import (
    file_shapes,
    load_state_strictly,
    load_transformers,
    resolve_pretrained,
    timm_dir_args,
    weights_file,
    without_pooler,
)
from mmssl.architectures.checkpoints import load_state as load_state  # re-exported for the towers that use it
from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.layout import to_channels_last


class TowerOutput(NamedTuple):
    features: Tensor  # forward_features: [B, T, D] token states (or a feature map)
    pooled: Tensor  # forward_head(pre_logits=True): [B, D]


class Tower(nn.Module):
    """Base class: a unimodal encoder following timm's contract."""

    num_features: int

    def forward_features(self, x: Any) -> Tensor:
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = True, **kwargs: Any) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Any) -> TowerOutput:
        """Token states and the pooled vector in one call. Callers go through ``tower(x)`` (not the methods), so
        module hooks, which ZeRO-3 uses to gather parameters, always fire.

        Towers that encode masked views (`encodes_masked_views`) also take the masked-forward contract shared by
        masked prediction: ``tower(x, mask=mask, mask_token=token, visible=v)`` with ``mask`` ``bool[B, T]`` (True =
        masked) over the ``T`` tokens of the plug-in's `mask` / `target` (its `MaskedView` grid, row-major):

        * replace mode (``mask_token`` ``[D]`` given; BEiT / SimMIM / HuBERT): masked tokens are replaced by it before
          the encoder; features ``[B, prefix + T, D]``, the last ``T`` aligned with the mask's tokens;
        * drop mode (no ``mask_token``; MAE): only unmasked tokens are encoded; features ``[B, prefix + v, D]``, the
          ``v`` slots after the prefix holding each row's unmasked tokens in token order (``v``: ``visible``, at
          least any row's unmasked count; where a row has fewer, its last slots are filler that callers must not
          read, and towers that cannot hide filler need the same count in every row).

        ``prefix``: the tower's leading tokens that stand for no masked token (class / register tokens, a video
        tower's frame states); ``features.shape[1] - T`` (replace) or ``- v`` (drop) of them."""
        features = self.forward_features(x)
        return TowerOutput(features, self.forward_head(features))

    def encodes_masked_views(self) -> bool:
        """Whether ``forward`` takes the masked-forward contract (``mask``, ``mask_token``, ``visible``)."""
        return False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError

    def feature_mask(self, x: Any) -> Tensor | None:
        """``bool[B, T]`` aligned with ``forward_features(x)``'s tokens, True where a token is real (not padding);
        None when every token is real."""
        return None

    def no_weight_decay(self) -> set[str]:
        return set()

    def input_embeddings(self) -> nn.Embedding | None:
        """The token-id embedding table of towers that have one (text), else None."""
        return None

    def parameters_outside_forward(self) -> list[nn.Parameter]:
        """Parameters the tower's ``forward`` reads without calling the module that owns them (for example a
        timm model's ``pos_embed`` when the tower calls ``model.forward_features`` directly). Engines that gather
        parameters in module hooks (ZeRO-3) must register these as used by the tower."""
        return []

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {}

    def save_native(self, out_dir: Path, extra: dict[str, Any]) -> None:
        """Write ``model.safetensors`` + ``config.json`` loadable by the tower's own library; ``extra`` is stored
        under the config's ``"mmssl"`` key."""
        raise NotImplementedError


def prefixed_matcher(prefix: str, matcher: dict[str, Any]) -> dict[str, Any]:
    def fix(pattern: Any) -> Any:
        if isinstance(pattern, str):
            return "|".join(f"^{prefix}" + p.lstrip("^") for p in pattern.split("|"))
        if isinstance(pattern, (list, tuple)):
            return [(fix(p), rest) if isinstance(p, str) else fix(p) for p, rest in pattern]
        return pattern

    return {k: fix(v) for k, v in matcher.items()}


class TimmTower(Tower):
    """Any timm model (ViT for images and spectrogram patches, CNNs, ...) with its classifier removed.

    ``channels_last`` (set by `architectures.layout.use_channels_last`): both forwards hand 4-D inputs to the model
    in channels-last layout."""

    channels_last = False

    def __init__(self, arch: str, model_args: dict[str, Any], *, pretrained: str | None = None,
                 input_size: tuple[int, ...] | None = None, strict: bool = True, where: str = "model",
                 data_config: dict[str, Any] | None = None) -> None:
        """``pretrained``: a ``.safetensors`` file, a directory (``model.safetensors`` + optional timm
        ``config.json``, whose ``model_args`` apply under ``model_args``), or a Hugging Face id in the local cache;
        loaded strictly unless ``strict=False`` (module docstring). ``where``: the recipe section named in errors
        (``model.image``). ``data_config``: preprocessing recorded in the tower's timm ``pretrained_cfg`` (mean,
        std, crop_pct, interpolation, crop_mode), so timm's ``resolve_data_config`` reproduces mmssl's."""
        super().__init__()
        if not timm.is_model(arch):
            raise ArchitectureError(f"unknown timm architecture {arch!r}")
        self.arch = arch
        self.input_size = tuple(input_size) if input_size else None
        self.source: str | None = None  # the local weights file this tower was initialised from
        weights: Path | None = None
        if pretrained:
            location = resolve_pretrained(pretrained, f"{where}.pretrained")
            weights = weights_file(str(location))
            self.source = str(weights.resolve())
            model_args = {**timm_dir_args(location, arch, where), **model_args}
        self.model_args = dict(model_args)
        self.data_config = dict(data_config or {})
        overlay = {**self.data_config, **({"input_size": self.input_size} if self.input_size else {})}
        self.model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=overlay or None, num_classes=0,
                                       **self.model_args)
        if weights is not None:  # a shape-only build (meta device) checks the file's header, reads no weights
            meta = building_on_meta()
            state = file_shapes(weights) if meta else load_file(str(weights))
            classifier = self.model.pretrained_cfg.get("classifier") or ()
            prefixes = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
            if state or not meta:  # on meta an empty file is a shape-only placeholder (`tools.recipes_check`)
                load_state_strictly(self.model, state, source=weights, where=where, what=f"timm {arch!r} tower",
                                    strict=strict, ignore=prefixes, check_only=meta)
        self.num_features = int(self.model.num_features)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.model.forward_features(self._layout(x))

    def _layout(self, x: Tensor) -> Tensor:
        return to_channels_last(x) if self.channels_last else x

    def forward_head(self, x: Tensor, pre_logits: bool = True, **kwargs: Any) -> Tensor:
        return self.model.forward_head(x, pre_logits=True)

    def forward(self, x: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None,
                visible: int | None = None) -> TowerOutput:
        """Without ``mask``: the plain forward. With ``mask`` (``bool[B, N]`` over patches, True = masked; ViTs
        only, see `patch_shape`): the masked-forward contract of `Tower.forward`. With ``mask_token`` (``[D]``)
        masked patch embeddings are replaced by it (BEiT / SimMIM / HuBERT); without, masked patches are dropped
        before the blocks and only the visible ones are encoded (MAE; timm's blocks take no padding mask, so every
        row must mask the same number of patches: ``visible`` of them, when the caller knows it, else counted on the
        device, which waits for it). Returned token states are ``[B, prefix + N or N_visible, D]``, prefix tokens
        (class / register) first."""
        if mask is None:
            return super().forward(x)
        features = self._forward_masked(x, mask, mask_token, visible)
        return TowerOutput(features, self.forward_head(features))

    def encodes_masked_views(self) -> bool:
        return self.patch_shape() is not None

    def patch_shape(self) -> tuple[int, int, int] | None:
        """``(in_chans, patch_h, patch_w)`` for towers that can encode a masked view (timm ViTs), else None."""
        embed = getattr(self.model, "patch_embed", None)
        if embed is None or not hasattr(self.model, "_pos_embed") or not hasattr(self.model, "blocks"):
            return None
        ph, pw = embed.patch_size
        return int(embed.proj.in_channels), int(ph), int(pw)

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0))

    def _forward_masked(self, x: Tensor, mask: Tensor, mask_token: Tensor | None, visible: int | None) -> Tensor:
        if self.patch_shape() is None:
            raise ArchitectureError(f"timm model {self.arch!r} cannot encode a masked view (ViT-family only)")
        vit = self.model
        tokens = vit.patch_embed(self._layout(x))
        if tokens.ndim == 4:  # NHWC output format
            tokens = tokens.flatten(1, 2)
        if mask.shape != tokens.shape[:2]:
            raise ArchitectureError(f"patch mask shape {tuple(mask.shape)} does not match the {tokens.shape[1]} "
                                    f"patches of {self.arch!r}")
        if mask_token is not None:
            tokens = torch.where(mask.unsqueeze(-1), mask_token.to(tokens.dtype), tokens)
        tokens = vit._pos_embed(tokens)
        if mask_token is None:
            if visible is None:
                keep = (~mask).sum(1)
                if bool((keep != keep[0]).any()):
                    raise ArchitectureError("dropping masked patches needs the same number masked in every row")
                visible = int(keep[0])
            prefix = self.num_prefix_tokens
            kept = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :visible]  # visible patches, in order
            patches = torch.gather(tokens[:, prefix:], 1, kept.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
            tokens = torch.cat([tokens[:, :prefix], patches], dim=1)
        tokens = vit.norm_pre(tokens)
        if getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled():
            from timm.models import checkpoint_seq

            tokens = checkpoint_seq(vit.blocks, tokens)
        else:
            tokens = vit.blocks(tokens)
        return vit.norm(tokens)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        names = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        return {f"model.{n}" for n in names}

    def parameters_outside_forward(self) -> list[nn.Parameter]:
        return list(self.model.parameters(recurse=False))  # cls_token, pos_embed, ...: owned by the timm model

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        if not hasattr(self.model, "group_matcher"):
            return {}
        return prefixed_matcher("model.", self.model.group_matcher(coarse))

    def timm_config(self) -> dict[str, Any]:
        pretrained_cfg: dict[str, Any] = {k: _jsonable(v) for k, v in self.data_config.items()}
        pretrained_cfg["num_classes"] = 0
        if self.input_size:
            pretrained_cfg["input_size"] = list(self.input_size)
        return {
            "architecture": self.arch,
            "num_classes": 0,
            "num_features": self.num_features,
            "model_args": _jsonable(self.model_args),
            "pretrained_cfg": pretrained_cfg,
        }

    def save_native(self, out_dir: Path, extra: dict[str, Any]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(out_dir / "model.safetensors"))
        (out_dir / "config.json").write_text(json.dumps({**self.timm_config(), "mmssl": extra}, indent=2) + "\n")


TOWER_INITS = ("timm", "clip")


def clip_initialise_vit(vit: nn.Module) -> None:
    """CLIP's width-scaled initialisation (Radford et al. 2021; OpenAI's ``CLIP.initialize_parameters``, which
    open_clip keeps for its text transformer) applied to a timm ViT of width ``w`` and ``L`` blocks::

        class token, positions ~ N(0, w^-1)
        attention q/k/v ~ N(0, w^-1)               attention output  ~ N(0, w^-1 / 2L)
        MLP in          ~ N(0, (2w)^-1)            MLP out           ~ N(0, w^-1 / 2L)

    biases and norms stay as timm sets them (0; LayerNorm 1, 0). timm's default (trunc-normal 0.02 for every
    weight, class token 1e-6) is sized for ViT-B's 768 width; at the widths of small models it leaves the residual
    branches, and the class token's dependence on the image, so small that every embedding starts alike (a
    contrastive loss then stays at ln N for its first steps; `mmssl bench parity` measures the difference)."""
    width, depth = int(vit.embed_dim), len(vit.blocks)
    attn_std, out_std, fc_std = width**-0.5, width**-0.5 * (2 * depth) ** -0.5, (2 * width) ** -0.5
    with torch.no_grad():
        for token in (getattr(vit, "cls_token", None), getattr(vit, "pos_embed", None)):
            if token is not None:
                nn.init.normal_(token, std=attn_std)
        for block in vit.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=out_std)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=out_std)


def expanded_attention_mask(mask: Tensor, implementation: str, dtype: torch.dtype) -> Tensor:
    """A transformers encoder's attention mask as the 4-D ``[B, 1, 1, T]`` form its attention takes, built here
    from the ``[B, T]`` padding mask (1 = real token): transformers' own construction asks the device whether any
    token is padded (to skip the mask), which makes every step wait for the device. SDPA takes booleans (True =
    attend), eager attention an additive bias; a row with no real token attends to every position (finite states,
    as transformers does for SDPA). Other implementations (flash attention) take the 2-D mask as it is."""
    if implementation not in ("sdpa", "eager"):
        return mask
    keep = mask.bool()[:, None, None, :]
    keep = keep | ~keep.any(-1, keepdim=True)
    if implementation == "sdpa":
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)


CAUSAL_TEXT_MODELS = ("clip_text_model",)  # transformers model types whose text encoder is causal
TEXT_POOLS = ("cls", "mean", "eot")


class HFTextTower(Tower):
    """A transformers text encoder over ``{"input_ids", "attention_mask"}``: a bidirectional BERT-style encoder, or a
    causal one (`CAUSAL_TEXT_MODELS`: CLIP's text transformer, Radford et al. 2021).

    Pooling: ``pool="cls"`` takes the first token's state; ``"mean"`` averages the states of the real (unmasked)
    tokens; ``"eot"`` takes the last real token's state, which is the end-of-text token the tokenizers append (CLIP's
    pooling: in a causal tower it is the only state that has read the whole text). A causal tower refuses ``"cls"``
    (its first state has read one token). The model's own pooler, if it has one, is dropped: pooling is the tower's
    job.

    A causal tower runs with no padding mask: tokenizers pad on the right and a real token attends to earlier
    positions only, so no real state reads padding (padding positions' own states are not used: `feature_mask`).
    """

    def __init__(self, *, config: Any = None, pretrained: str | None = None, pool: str | None = None,
                 strict: bool = True, where: str = "model.text") -> None:
        """``config``: the transformers config of a randomly initialised tower or, with ``pretrained``, the
        pretrained model's config with the recipe's size keys applied (the checkpoint must then fit it; default:
        the checkpoint's own). ``pretrained``: a directory holding ``config.json`` (``save_pretrained``'s layout)
        or a Hugging Face id in the local cache; loaded strictly unless ``strict=False`` (module docstring).
        ``pool``: see the class docstring; None: ``eot`` for a causal tower, ``cls`` otherwise. ``where``: the recipe
        section named in errors."""
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if pool is not None and pool not in TEXT_POOLS:
            raise ArchitectureError(f"{where}.pool must be one of {list(TEXT_POOLS)}, got {pool!r}")
        self.source: str | None = None  # the local weights file this tower was initialised from
        if pretrained:
            path = resolve_pretrained(pretrained, f"{where}.pretrained")
            if not (path / "config.json").is_file():
                raise ArchitectureError(f"{where}.pretrained: no transformers model at {path} (config.json missing)")
            weights = path / "model.safetensors"
            self.source = str(weights.resolve()) if weights.is_file() else str(path.resolve())
            if config is None:
                config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            if building_on_meta():  # shape-only build (recipe validation): the architecture, not the weights
                self.model = without_pooler(AutoModel.from_config, config)
            else:
                self.model = load_transformers(path, config, strict=strict, where=where)
        elif config is not None:
            self.model = without_pooler(AutoModel.from_config, config)
        else:
            raise ArchitectureError("HFTextTower needs a config or a pretrained path")
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None
        self.causal = self.model.config.model_type in CAUSAL_TEXT_MODELS
        self.pool = pool = pool or ("eot" if self.causal else "cls")
        if self.causal and pool == "cls":
            raise ArchitectureError(f"model.text.pool='cls' reads the first token, which a causal text tower "
                                    f"({self.model.config.model_type}) computes from that token alone; use pool: eot "
                                    "(CLIP's end-of-text token) or mean")
        self.num_features = int(self.model.config.hidden_size)

    def input_embeddings(self) -> nn.Embedding | None:
        return self.model.get_input_embeddings()

    def forward_features(self, x: dict[str, Tensor]) -> Tensor:
        if self.causal:  # right padding: no real token reads a later (padding) position (class docstring)
            return self.model(input_ids=x["input_ids"]).last_hidden_state
        mask = expanded_attention_mask(x["attention_mask"], self.model.config._attn_implementation,
                                       self.model.get_input_embeddings().weight.dtype)
        return self.model(input_ids=x["input_ids"], attention_mask=mask).last_hidden_state

    def forward_head(self, x: Tensor, pre_logits: bool = True, attention_mask: Tensor | None = None,
                     **kwargs: Any) -> Tensor:
        if self.pool == "eot" and attention_mask is not None:
            last = (attention_mask.sum(1) - 1).clamp_min(0)
            return x[torch.arange(x.shape[0], device=x.device), last]
        if self.pool != "mean" or attention_mask is None:
            return x[:, 0]
        mask = attention_mask.to(x.dtype).unsqueeze(-1)
        return (x * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, x: dict[str, Tensor]) -> TowerOutput:
        features = self.forward_features(x)
        return TowerOutput(features, self.forward_head(features, attention_mask=x["attention_mask"]))

    def feature_mask(self, x: dict[str, Tensor]) -> Tensor:
        return x["attention_mask"].bool()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5
            if enable:
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.activation_checkpointing_disable()
        elif enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_disable()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^model\.embeddings",
                "blocks": [(r"^model\.encoder\.layers?\.(\d+)", None), (r"^model\.final_layer_norm", (99999,))]}

    def save_native(self, out_dir: Path, extra: dict[str, Any]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.config.mmssl = extra
        try:
            self.model.save_pretrained(str(out_dir), safe_serialization=True)
        finally:
            del self.model.config.mmssl


def building_on_meta() -> bool:
    """True inside ``with torch.device("meta")``: modules are being built for their shapes only."""
    return torch.empty(0).device.type == "meta"


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value)
    return value

"""The modality plug-in contract.

A plug-in owns everything that is specific to one modality:

* its tower configuration (a dataclass: tower size and the preprocessing the tower expects),
* ``decoder(cfg, train)``: shard member bytes -> tensor (tree), the per-sample preprocessing run in loader workers,
* ``build_tower(cfg)``: the encoder, from timm or transformers, randomly initialised or from local weights,
* ``export_assets(cfg, out_dir)``: files an exported encoder needs besides its weights (a tokenizer),
* ``build_embedder(cfg, width)``: the modality's tokeniser for the unified encoder (`architectures.embedders`):
  input -> ``[B, T, width]`` tokens with positional encoding, and a ``bool[B, T]`` real-token mask,
* ``mask(cfg, x, ratio, generator, kind=...)``: a mask over those ``T`` tokens (``bool[B, T]``, True = masked) of
  one of the ``mask_kinds(cfg)`` (the first is the default), drawn by `architectures.modalities.masking`,
* ``target(cfg, x)``: the per-token reconstruction target for masked prediction (``[B, T, P]``; text: the ids),
* ``masked_view(cfg, tower)``: the token ``grid`` and target width ``P`` of the masked view when ``tower`` can encode
  one (its ``forward(x, mask=..., mask_token=..., visible=...)``, `architectures.towers.Tower`), else None,
* ``corruptions`` and ``corrupted_decoder(cfg, kind, level)``: the modality's noise topology for robustness
  evaluation (MultiBench, Liang et al. 2021): the evaluation decoder with corruption ``kind`` applied at strength
  ``level ∈ [0, 1]`` at the stage it belongs to (`architectures.modalities.corruptions`); level 0 is the clean
  evaluation decoder, bit for bit.

Adding a modality means adding one file to this package that defines a subclass (``modalities/__init__.py`` discovers
and registers it by ``name``).
Fields whose metadata carries ``{"path": True}`` are file paths: recipe loading resolves and checks them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
from torch import Tensor

from mmssl.architectures.checkpoints import find_pretrained, hub_id, not_found_message
from mmssl.architectures.embedders import TokenEmbedder
from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.modalities.masking import Generators
from mmssl.architectures.towers import TOWER_INITS, TimmTower, Tower, clip_initialise_vit

Decoded = Tensor | dict[str, Tensor]
DecoderFn = Callable[[bytes, np.random.Generator], Decoded]


def path_field(default: str | None = None, help: str = "") -> Any:
    return field(default=default, metadata={"path": True, "help": help})


@dataclass
class TowerConfig:
    """Fields every tower has. ``model_args`` passes any further keyword to the library's constructor.

    The ``arch`` name defines the tower: the size keys (`SIZE_KEYS`: ``width``, ``depth``, ``heads``,
    ``mlp_ratio``, ``pool``; None: unset) reach timm / transformers only when a recipe sets them, so
    ``arch: vit_base_patch16_224`` is a ViT-B/16 and a pretrained tower is its checkpoint's size; a key that is set
    overrides the arch's (a pretrained file must then fit it, see ``pretrained_strict``). Code that needs a tower's
    width reads it from the built tower (``num_features``). ``pretrained``: a ``.safetensors`` file, a directory,
    or a Hugging Face id (``org/name``, ``hf-hub:org/name``) found in the local cache (never downloaded);
    ``pretrained_strict: false`` loads the part of a checkpoint that fits and logs the rest
    (`architectures.checkpoints`)."""

    arch: str = ""
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    mlp_ratio: float | None = None
    dropout: float = 0.0
    drop_path: float = 0.0
    pool: str | None = None
    pretrained: str | None = path_field(help="local weights: a .safetensors file, a directory, or a Hugging Face id "
                                             "in the local cache")
    pretrained_strict: bool = True
    frozen: bool = False
    grad_checkpointing: bool = False
    patch_dropout: float = 0.0  # ViT towers: share of patch tokens dropped when training (FLIP, Li et al. 2023)
    init: str = "timm"  # ViT towers: "timm" (the library's) or "clip" (CLIP's width-scaled, `clip_initialise_vit`)
    model_args: dict[str, Any] = field(default_factory=dict)


SIZE_KEYS = ("width", "depth", "heads", "mlp_ratio", "pool")  # None: the arch's own
VIT_PREFIXES = ("vit_", "deit_", "eva")
MLP_RATIO = 4.0  # hidden = width · 4 when a recipe sets a transformers tower's width but not its mlp_ratio


def resolve_path_field(f: Any, value: str) -> str:
    """A tower config path field's value made absolute (recipe loading); for ``pretrained`` a Hugging Face id
    that is not a local path becomes its snapshot directory in the local cache, and stays as written when the
    cache lacks it too (building the tower then says where it looked, `architectures.checkpoints`)."""
    if f.name == "pretrained":
        found = find_pretrained(value)
        if found is None:
            return value if hub_id(value) is not None else str(Path(value).expanduser().resolve())
        return str(found.resolve())
    return str(Path(value).expanduser().resolve())


def missing_path_message(f: Any, value: str) -> str:
    """Why path field ``f``'s ``value`` names nothing (for ``pretrained``: the cache it looked in too)."""
    return not_found_message(value) if f.name == "pretrained" else f"file not found: {value}"


def hf_sizes(cfg: TowerConfig, hidden_size: int | None = None) -> dict[str, Any]:
    """The transformers config fields a recipe's size keys set, and only those: ``hidden_size`` (width),
    ``num_hidden_layers`` (depth), ``num_attention_heads`` (heads), ``intermediate_size = ⌊width·mlp_ratio⌋``
    (when width or mlp_ratio is set; mlp_ratio defaults to 4, width to ``hidden_size``, the config's own)."""
    sizes: dict[str, Any] = {}
    for key, name in (("width", "hidden_size"), ("depth", "num_hidden_layers"), ("heads", "num_attention_heads")):
        if getattr(cfg, key) is not None:
            sizes[name] = getattr(cfg, key)
    width = cfg.width if cfg.width is not None else hidden_size
    if width is not None and (cfg.width is not None or cfg.mlp_ratio is not None):
        sizes["intermediate_size"] = int(width * (cfg.mlp_ratio if cfg.mlp_ratio is not None else MLP_RATIO))
    return sizes


def timm_tower(cfg: TowerConfig, *, in_chans: int, img_size: list[int], patch_size: int | list[int] | None,
               where: str = "model", data_config: dict[str, Any] | None = None) -> TimmTower:
    """A timm tower for image-like input ``[in_chans, *img_size]``. For ViT-family archs the image size, the
    patch size (None: the arch's), pooling, dropout, patch dropout and the size keys a recipe sets come from
    ``cfg`` (any timm model otherwise, e.g. a ResNet); ``cfg.model_args`` overrides anything. ``where``: the recipe
    section (``model.image``); ``data_config``: the preprocessing recorded in the tower's timm config.

    ``patch_dropout`` (FLIP, Li et al. 2023, "Scaling Language-Image Pre-training via Masking"): in training mode a
    random ``patch_dropout`` share of each sample's patch tokens is dropped after the position embedding (timm's
    ``PatchDropout``; prefix tokens kept), so the blocks run on ``⌈(1 - p)·N⌉`` tokens; evaluation sees every patch."""
    if not 0.0 <= cfg.patch_dropout < 1.0:
        raise ArchitectureError(f"patch_dropout must be in [0, 1), got {cfg.patch_dropout}")
    args: dict[str, Any] = {"in_chans": in_chans, "drop_path_rate": cfg.drop_path}
    if cfg.arch.startswith(VIT_PREFIXES):
        sizes = {"patch_size": patch_size, "embed_dim": cfg.width, "depth": cfg.depth, "num_heads": cfg.heads,
                 "mlp_ratio": cfg.mlp_ratio, "global_pool": cfg.pool}
        args.update(img_size=img_size, proj_drop_rate=cfg.dropout, attn_drop_rate=cfg.dropout,
                    **{k: v for k, v in sizes.items() if v is not None})
        if cfg.patch_dropout:
            args["patch_drop_rate"] = cfg.patch_dropout
    elif cfg.patch_dropout:
        raise ArchitectureError(f"patch_dropout applies to ViT towers; {cfg.arch!r} has no patch tokens")
    args.update(cfg.model_args)
    if cfg.init not in TOWER_INITS:
        raise ArchitectureError(f"init must be one of {list(TOWER_INITS)}, got {cfg.init!r}")
    if cfg.init == "clip" and not cfg.arch.startswith(VIT_PREFIXES):
        raise ArchitectureError(f"init='clip' applies to ViT towers; {cfg.arch!r} is not one")
    if cfg.init == "clip" and cfg.pretrained:
        raise ArchitectureError(f"init='clip' initialises a tower that pretrained={cfg.pretrained!r} then overwrites; "
                                "set one of them")
    tower = TimmTower(cfg.arch, args, pretrained=cfg.pretrained, input_size=(in_chans, *img_size),
                      strict=cfg.pretrained_strict, where=where, data_config=data_config)
    if cfg.init == "clip":
        clip_initialise_vit(tower.model)
    return tower


DeviceTransform = Callable[[Tensor], Tensor]


class MaskedView(NamedTuple):
    """What a tower that encodes masked views offers masked prediction (`ModalityPlugin.masked_view`)."""

    grid: tuple[int, ...]  # the T tokens of `mask` / `target` as a row-major grid: (gh, gw), (G, gh, gw), (T,)
    target_dim: int  # P: the width of `target`'s [B, T, P]


class ModalityPlugin(ABC):
    name: ClassVar[str]
    config_cls: ClassVar[type[TowerConfig]]
    extensions: ClassVar[tuple[str, ...]]  # shard member extensions this modality is read from, by preference
    corruptions: ClassVar[tuple[str, ...]] = ()  # corruption kinds `corrupted_decoder` supports

    @abstractmethod
    def decoder(self, cfg: Any, *, train: bool) -> DecoderFn: ...

    @abstractmethod
    def build_tower(self, cfg: Any) -> Tower: ...

    def compact_decoder(self, cfg: Any) -> tuple[DecoderFn, DeviceTransform | None]:
        """The training decoder in its compact form for the trip to the device, and the transform that finishes
        it there (None: the decoder's output is final). Image plug-ins send uint8 pixels (a quarter of float32's
        bytes) and normalise them on the device; the default is ``decoder(cfg, train=True)`` as it is."""
        return self.decoder(cfg, train=True), None

    def export_assets(self, cfg: Any, out_dir: Path) -> dict[str, Any]:
        """Copy what the exported encoder needs besides weights into ``out_dir``; return config overrides
        (paths rewritten relative to ``out_dir``)."""
        return {}

    def build_embedder(self, cfg: Any, width: int) -> TokenEmbedder:
        raise NotImplementedError(f"modality {self.name!r} has no token embedder")

    def mask_kinds(self, cfg: Any) -> tuple[str, ...]:
        """The mask kinds `mask` draws for this configuration, the default first (none: no masking)."""
        return ()

    def check_mask_kind(self, cfg: Any, kind: str | None) -> str:
        """``kind`` (None: the default), checked against `mask_kinds`."""
        kinds = self.mask_kinds(cfg)
        if not kinds:
            raise ArchitectureError(f"modality {self.name!r} has no masking function")
        if kind is None:
            return kinds[0]
        if kind not in kinds:
            raise ArchitectureError(f"modality {self.name!r} has no {kind!r} mask (mask kinds: {list(kinds)})")
        return kind

    def mask(self, cfg: Any, x: Decoded, ratio: float, generator: Generators = None, *, kind: str | None = None,
             span_length: int = 1) -> Tensor:
        """``bool[B, T]`` (True = masked) over the modality's ``T`` tokens: ``kind`` (default: the first of
        `mask_kinds`) at ``ratio`` (for ``span``: the share of steps that start a span of ``span_length``), drawn
        from ``generator`` on ``x``'s device (pass the host batch's ``x``: nothing is read from a device)."""
        raise NotImplementedError(f"modality {self.name!r} has no masking function")

    def target(self, cfg: Any, x: Decoded) -> Tensor:
        raise NotImplementedError(f"modality {self.name!r} has no reconstruction target")

    def masked_view(self, cfg: Any, tower: Tower) -> MaskedView | None:
        """The grid and target width of the view ``tower`` encodes under a `mask`, or None when it encodes none."""
        return None

    def random_example(self, cfg: Any, batch_size: int) -> Decoded:
        """A batch of valid random inputs (for shape checks, benchmarks and meta-device builds)."""
        raise NotImplementedError

    def corrupted_decoder(self, cfg: Any, kind: str, level: float) -> DecoderFn:
        """The evaluation decoder (``decoder(cfg, train=False)``) with corruption ``kind`` at strength ``level`` in
        [0, 1] (0: the clean evaluation decoder itself). Random draws come from the per-sample generator the stream
        passes, so the corrupted data is a deterministic function of the sample key."""
        level = check_corruption(self.name, self.corruptions, kind, level)
        if level == 0.0:
            return self.decoder(cfg, train=False)
        return self.build_corrupted_decoder(cfg, kind, level)

    def build_corrupted_decoder(self, cfg: Any, kind: str, level: float) -> DecoderFn:
        """`corrupted_decoder` for a checked ``kind`` and a ``level`` in (0, 1]; plug-ins with ``corruptions``
        override it."""
        raise NotImplementedError(f"modality {self.name!r} has no corruption {kind!r}")


def check_corruption(modality: str, supported: tuple[str, ...], kind: str, level: float) -> float:
    """``level`` as a float after checking that ``kind`` is one of ``supported`` and ``0 <= level <= 1``."""
    if kind not in supported:
        raise ArchitectureError(f"modality {modality!r}: unknown corruption kind {kind!r}; supported: "
                                f"{list(supported)}")
    try:
        value = float(level)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise ArchitectureError(f"modality {modality!r}: corruption level for {kind!r} must be in [0, 1], got "
                                f"{level!r} (corruption kinds: {list(supported)})")
    return value

"""The ``model:`` section of a recipe, and building a model from it.

Besides its own fields, ``model:`` takes one key per modality (``audio:``, ``text:``, ``image:``, ...), each parsed
into that modality plug-in's tower config, so ``model.audio.depth=2`` on the command line reaches the audio tower.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mmssl.architectures.fusion_free import FusionFreeModel
from mmssl.architectures.fusion_ops import build_fusion, fusion_options
from mmssl.architectures.heads import HEAD_KINDS, ProjectionHead
from mmssl.architectures.late_fusion import LateFusionModel
from mmssl.architectures.modalities import MODALITIES, TowerConfig, get_modality
from mmssl.architectures.outputs import ModelSpec
from mmssl.architectures.stitching.bridges import build_bridge
from mmssl.architectures.stitching.lm import FrozenLM
from mmssl.architectures.stitching.model import StitchedModel
from mmssl.architectures.towers import ArchitectureError
from mmssl.architectures.unified import UnifiedModel

FAMILIES = ("fusion_free", "late_fusion", "unified", "stitched")


@dataclass
class FusionConfig:
    """``model.fusion`` (late_fusion): the fusion operator ``kind`` (`OPERATOR_FUSIONS`) over the towers' tokens;
    ``fused[query]`` is the query modality's fused states. ``depth``/``heads``/``mlp_ratio``/``dropout`` reach the
    kinds that take them; ``options`` holds the rest (``rank`` for low_rank, ``gate`` for gated, ...)."""

    kind: str = "cross_attention"
    query: str = "text"
    width: int = 256
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class UnifiedConfig:
    """``model.unified``: one shared transformer over every modality's tokens (`architectures.unified`); each
    modality's ``model.<m>`` section then configures only its tokeniser (patch / frame / vocabulary sizes)."""

    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    experts: bool = False
    fusion_depth: int = 1
    latents: int = 0
    latent_depth: int = 1
    drop_path: float = 0.0
    query: str = "text"
    grad_checkpointing: bool = False
    drop_tokens: dict[str, float] = field(default_factory=dict)  # modality -> DropToken rate in training (VATT)


@dataclass
class StitchConfig:
    """``model.stitched``: a frozen vision tower (``model.image``: a timm ``arch`` and local ``pretrained``
    weights) and a frozen language model (``model.text.pretrained``: a local transformers directory, with its
    tokenizer) joined by a trainable ``bridge`` (`architectures.stitching.bridges.build_bridge`: linear, mlp,
    prefix, qformer, flamingo; ``options`` go to its constructor)."""

    bridge: str = "qformer"
    options: dict[str, Any] = field(default_factory=dict)
    fuse_text: bool = True


@dataclass
class ModelConfig:
    family: str = "fusion_free"
    embed_dim: int = 256
    head: str = "linear"
    fusion: FusionConfig = field(default_factory=FusionConfig)
    unified: UnifiedConfig = field(default_factory=UnifiedConfig)
    stitched: StitchConfig = field(default_factory=StitchConfig)
    towers: dict[str, TowerConfig] = field(default_factory=dict)

    # Keys of `model:` that are not fields are modality names; their values parse into the plug-in's config.
    EXTRA_KEYS_FIELD: ClassVar[str] = "towers"

    @staticmethod
    def extra_key_type(key: str) -> type | None:
        plugin = MODALITIES.get(key)
        return plugin.config_cls if plugin is not None else None

    @staticmethod
    def extra_key_names() -> list[str]:
        return sorted(MODALITIES)

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise ArchitectureError(f"model.family must be one of {FAMILIES}, got {self.family!r}")
        if self.head not in HEAD_KINDS:
            raise ArchitectureError(f"model.head must be one of {HEAD_KINDS}, got {self.head!r}")
        if not self.towers:
            raise ArchitectureError(f"model has no tower; add at least one of {self.extra_key_names()}")
        if self.embed_dim < 1:
            raise ArchitectureError(f"model.embed_dim must be >= 1, got {self.embed_dim}")
        if self.family == "late_fusion":
            if self.fusion.query not in self.towers:
                raise ArchitectureError(f"model.fusion.query={self.fusion.query!r} names no tower "
                                        f"(towers: {sorted(self.towers)})")
            if len(self.towers) < 2:
                raise ArchitectureError("model.family=late_fusion needs at least two towers")
            fusion_options(self.fusion.kind)  # names the kind if unknown
        if self.family == "stitched":
            if set(self.towers) != {"image", "text"}:
                raise ArchitectureError(f"model.family=stitched joins model.image (frozen vision tower) and "
                                        f"model.text (frozen language model); got towers {sorted(self.towers)}")
            for m, what in (("image", "a .safetensors file of the vision tower"),
                            ("text", "a local transformers directory")):
                if not self.towers[m].pretrained:
                    raise ArchitectureError(f"model.family=stitched needs model.{m}.pretrained: {what}")
        if self.family == "unified" and len(self.towers) > 1 and self.unified.query not in self.towers:
            raise ArchitectureError(f"model.unified.query={self.unified.query!r} names no modality "
                                    f"(modalities: {sorted(self.towers)})")


def build_model(cfg: ModelConfig, *, seed: int | None = None,
                frozen_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Build the model (its ``spec`` set); with ``seed``, parameter initialisation is reproducible.
    ``frozen_dtype``: the dtype frozen parameters are held in (a bf16 run's compute dtype: a frozen LM is loaded
    in it directly, so no rank's host ever holds its fp32 copy); buffers keep theirs, as under DeepSpeed's cast."""
    cfg.validate()
    if seed is not None:
        torch.manual_seed(seed)
    if cfg.family == "unified":
        return _cast_frozen(build_unified(cfg), frozen_dtype)
    if cfg.family == "stitched":
        return _cast_frozen(build_stitched(cfg, frozen_dtype), frozen_dtype)
    towers, heads = {}, {}
    for name, tower_cfg in cfg.towers.items():
        tower = get_modality(name).build_tower(tower_cfg)
        if tower_cfg.grad_checkpointing:
            tower.set_grad_checkpointing(True)
        if tower_cfg.frozen:
            tower.requires_grad_(False)
        towers[name] = tower
        heads[name] = ProjectionHead(tower.num_features, cfg.embed_dim, cfg.head)
    if cfg.family == "late_fusion":
        model: FusionFreeModel = LateFusionModel(towers, heads, build_late_fusion(cfg.fusion, towers), cfg.fusion.query)
    else:
        model = FusionFreeModel(towers, heads)
    widths = {m: int(t.num_features) for m, t in towers.items()}
    model.spec = model_spec(cfg, widths, fusion_dim=cfg.fusion.width if cfg.family == "late_fusion" else None,
                            towers=towers)
    model.tower_configs = dict(cfg.towers)
    return _cast_frozen(model, frozen_dtype)


def _cast_frozen(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    if dtype is not None:
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model


def build_unified(cfg: ModelConfig) -> UnifiedModel:
    u = cfg.unified
    embedders = {m: get_modality(m).build_embedder(tower_cfg, u.width) for m, tower_cfg in cfg.towers.items()}
    model = UnifiedModel(embedders, width=u.width, depth=u.depth, heads=u.heads, mlp_ratio=u.mlp_ratio,
                         embed_dim=cfg.embed_dim, head=cfg.head, experts=u.experts, fusion_depth=u.fusion_depth,
                         latents=u.latents, latent_depth=u.latent_depth, drop_path=u.drop_path, query=u.query,
                         drop_token_rates=u.drop_tokens)
    if u.grad_checkpointing:
        model.set_grad_checkpointing(True)
    widths = dict.fromkeys(cfg.towers, u.width)
    model.spec = model_spec(cfg, widths, fusion_dim=u.width if u.fusion_depth > 0 else None)
    model.tower_configs = dict(cfg.towers)
    return model


def build_stitched(cfg: ModelConfig, frozen_dtype: torch.dtype | None = None) -> StitchedModel:
    s, image, text = cfg.stitched, cfg.towers["image"], cfg.towers["text"]
    vision = get_modality("image").build_tower(image)
    lm = FrozenLM.from_pretrained(str(text.pretrained), dtype=frozen_dtype or torch.float32)
    options = dict(s.options)
    if s.bridge == "flamingo":
        options.setdefault("num_lm_layers", len(lm.layers()))
    bridge = build_bridge(s.bridge, vision.num_features, lm.hidden_size, **options)
    tok = get_modality("text").tokenizer(text)
    model = StitchedModel(vision, lm, bridge, embed_dim=cfg.embed_dim, head=cfg.head,
                          special_tokens=tok.special_ids(), vocab_size=tok.vocab_size, fuse_text=s.fuse_text)
    model.spec = model.model_spec()
    model.spec.mask_kinds.update(mask_kinds(cfg))
    model.tower_configs = dict(cfg.towers)
    return model


def build_late_fusion(f: FusionConfig, towers: dict[str, Any]) -> torch.nn.Module:
    accepted = fusion_options(f.kind)
    common = {k: getattr(f, k) for k in ("depth", "heads", "mlp_ratio", "dropout") if k in accepted}
    if "queries" in accepted and "queries" not in f.options:
        common["queries"] = [f.query]  # MulT: build only the query's crossmodal transformers (no unused weights)
    return build_fusion(f.kind, {m: t.num_features for m, t in towers.items()}, f.width, **common, **f.options)


def mask_kinds(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """The mask kinds each modality's plug-in draws (modalities that draw none left out)."""
    kinds = {m: get_modality(m).mask_kinds(tower_cfg) for m, tower_cfg in cfg.towers.items()}
    return {m: k for m, k in kinds.items() if k}


def model_spec(cfg: ModelConfig, widths: dict[str, int], *, fusion_dim: int | None,
               towers: dict[str, Any] | None = None) -> ModelSpec:
    """Sizes objectives build their heads from: widths, vocabularies and special tokens, and masked prediction's
    facts (every plug-in's mask kinds; the token grid and target width of each tower that encodes masked views)."""
    spec = ModelSpec(
        family=cfg.family,
        modalities=tuple(widths),
        embed_dim=cfg.embed_dim,
        feature_dims=dict(widths),
        token_dims=dict(widths),
        fusion_dim=fusion_dim,
    )
    for m, tower_cfg in cfg.towers.items():
        plugin = get_modality(m)
        tokenizer = getattr(plugin, "tokenizer", None)
        if tokenizer is not None:
            tok = tokenizer(tower_cfg)
            spec.vocab_sizes[m] = int(tok.vocab_size)
            spec.special_tokens[m] = tok.special_ids()
        tower = (towers or {}).get(m)
        view = plugin.masked_view(tower_cfg, tower) if tower is not None and tower.encodes_masked_views() else None
        if view is not None:
            spec.mask_grids[m], spec.mask_targets[m] = tuple(view.grid), int(view.target_dim)
    spec.mask_kinds.update(mask_kinds(cfg))
    return spec


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable}

"""Joint masked autoencoding through the fusion module: CAV-MAE's masked audio-visual modelling (Gong et al. 2023,
"Contrastive Audio-Visual Masked Autoencoder", ICLR).

For every modality ``m`` of ``modalities`` (towers that encode masked views, ``spec.mask_targets``: ViT patches,
video tubelets, sequence patches), the model masks a ``mask_ratio`` of the tokens per sample (``model.mask``: random,
or tube for video; seeded from the seed, batch index and sample key, as ``mae``) and the tower encodes only the
visible ones (``model.encode_masked``); the tower's prefix tokens (class / register, frame states) are dropped. The
visible tokens of all modalities are then fused jointly, ``J = model.fuse_joint({m: V_m}, {m: present rows})`` (a
fusion operator with joint states, ``merged``: CAV-MAE's joint layer). One decoder owned by the objective maps each
modality's fused states ``J_m`` to its width with a shared linear map, puts a shared learned mask token at the
masked positions, adds the fixed sin-cos positions of ``m``'s token grid (`objectives.masking.sincos_positions`; 2-D
for patches, as CAV-MAE) and a learned modality embedding ``e_m``, runs pre-norm transformer blocks over the
concatenation of every modality's full sequence (an absent modality's positions masked as keys) and predicts each
modality's tokens (``model.target``) with its own linear head.
With ``t`` the normalised-pixel target of MAE (`objectives.masked.norm_pix_target`)::

    L = Σ_m 1/|M_m| Σ_{(b,n) ∈ M_m} mean_d (ŷ^m_{b,n,d} - t^m_{b,n,d})²

``M_m``: the masked tokens of rows where ``m`` is present, ``|M_m|`` counted over all ranks. CAV-MAE sums the
audio and visual reconstruction losses (mae_loss_weight 1.0) and decodes with 8 blocks, 512 wide, 16 heads.
A row where a modality is absent contributes masked keys only to the fusion and nothing to that modality's loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mmssl.objectives.base import (
    BlockFactory,
    LossOutput,
    ModelOutputs,
    ModelSpec,
    MultimodalModel,
    Objective,
    ObjectiveError,
    Requirements,
    decoder_blocks,
)
from mmssl.objectives.ids import to_device
from mmssl.objectives.masked import DROP_KINDS, _device, _gens, _rows, mae_loss, mask_kind, unshuffle
from mmssl.objectives.masking import host_input, host_row_counts, presence, sincos_positions, visible_slots


@dataclass
class JointMAEConfig:
    """``objectives.joint_mae``."""

    weight: float = 1.0
    modalities: list[str] = field(default_factory=list)
    mask_ratio: float = 0.75
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = True
    seed: int = 0
    global_norm: bool = True


class JointMAEDecoder(nn.Module):
    """The shared decoder of the module docstring."""

    def __init__(self, in_dim: int, patch_dims: dict[str, int], *, block: BlockFactory, width: int, depth: int,
                 heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, width)
        self.mask_token = nn.Parameter(torch.randn(width) * 0.02)
        self.modality = nn.ParameterDict({m: nn.Parameter(torch.randn(width) * 0.02) for m in patch_dims})
        self.blocks = decoder_blocks(block, depth, width, heads, mlp_ratio)  # the model's block (spec.block)
        self.norm = nn.LayerNorm(width)
        self.preds = nn.ModuleDict({m: nn.Linear(width, d) for m, d in patch_dims.items()})

    def forward(self, fused: dict[str, Tensor], masks: dict[str, Tensor], grids: dict[str, tuple[int, ...]],
                present: dict[str, Tensor]) -> dict[str, Tensor]:
        """``fused[m]`` ``[B, V_m, F]`` (visible tokens in grid order), ``masks[m]`` ``bool[B, N_m]`` over the
        ``N_m = prod(grids[m])`` tokens, ``present[m]`` ``bool[B]``: predictions ``[B, N_m, patch_dim_m]`` for every
        token of every modality. A modality absent from a row is no key of that row's attention (a row with none
        present gets no attention update)."""
        names = sorted(fused)
        seqs, keys = [], []
        for m in names:
            full = unshuffle(self.embed(fused[m]), masks[m], self.mask_token)
            pos = sincos_positions(tuple(grids[m]), full.shape[-1]).to(full.device, full.dtype)
            seqs.append(full + pos + self.modality[m].to(full.dtype))
            keys.append(present[m].bool()[:, None].expand(-1, full.shape[1]))
        x = torch.cat(seqs, dim=1)
        keep = torch.cat(keys, dim=1)
        for block in self.blocks:
            x = block(x, keep)
        x = self.norm(x)
        parts = x.split([s.shape[1] for s in seqs], dim=1)
        return {m: self.preds[m](part) for m, part in zip(names, parts, strict=True)}


class JointMAEObjective(Objective):
    """``joint_mae`` (module docstring)."""

    def __init__(self, cfg: JointMAEConfig, spec: ModelSpec) -> None:
        super().__init__()
        mods = list(dict.fromkeys(cfg.modalities))
        if len(mods) < 2:
            raise ObjectiveError(f"modalities must name at least two modalities to fuse, got {cfg.modalities}")
        missing = [m for m in mods if m not in spec.mask_targets]
        if missing:
            raise ObjectiveError(f"modality {missing[0]!r} has no tower that encodes a masked view; joint_mae needs "
                                 f"one per modality (maskable: {sorted(spec.mask_targets)})")
        if not 0 < cfg.mask_ratio < 1:
            raise ObjectiveError(f"mask_ratio must be in (0, 1), got {cfg.mask_ratio}")
        if cfg.decoder_width % 4:
            raise ObjectiveError(f"decoder_width={cfg.decoder_width} must be divisible by 4 for sin-cos positions")
        if spec.fusion_dim is None:
            raise ObjectiveError("joint_mae fuses the modalities: it needs model.family: late_fusion with "
                                 "model.fusion.kind: merged")
        self.cfg, self.modalities = cfg, mods
        self.kinds = {m: mask_kind(spec, m, None, "joint_mae", DROP_KINDS) for m in mods}  # random, or tube (video)
        self.grids = {m: tuple(spec.mask_grids[m]) for m in mods}
        patch_dims = {m: int(spec.mask_targets[m]) for m in mods}
        self.decoder = JointMAEDecoder(spec.fusion_dim, patch_dims, block=spec.block,
                                       width=cfg.decoder_width, depth=cfg.decoder_depth, heads=cfg.decoder_heads,
                                       mlp_ratio=cfg.mlp_ratio)
        self.requires = Requirements(modalities=tuple(mods), needs_fusion=True, needs_decoder=True,
                                     needs_masked_view=tuple(mods), gathers_across_ranks=cfg.global_norm)

    @classmethod
    def from_config(cls, cfg: JointMAEConfig, spec: ModelSpec | None = None) -> JointMAEObjective:
        if spec is None:
            raise ObjectiveError("joint_mae needs the model spec (masked views, fusion width)")
        return cls(cfg, spec)

    def no_weight_decay(self) -> set[str]:
        return {"decoder.mask_token"} | {f"decoder.modality.{m}" for m in self.modalities}

    def make_masks(self, batch: Any, model: MultimodalModel) -> dict[str, Tensor]:
        """``bool[B, N_m]`` per modality, True = masked: the model's mask (random, or tube for video), drawn on the
        host; a different draw per modality (stream = modality index)."""
        masks = {}
        for i, m in enumerate(self.modalities):
            x = host_input(batch, m)
            masks[m] = model.mask(m, x, self.cfg.mask_ratio, _gens(self.cfg.seed + 7919 * i, batch, _rows(x)),
                                  kind=self.kinds[m])
        return masks

    def forward(self, outputs: ModelOutputs, batch: Any = None, model: Any = None) -> LossOutput:
        if batch is None or model is None:
            raise ObjectiveError("joint_mae needs the batch and the model")
        fuse_joint = getattr(model, "fuse_joint", None)
        if fuse_joint is None:
            raise ObjectiveError(f"model family {getattr(model, 'family', '?')!r} has no joint fusion; joint_mae "
                                 "needs model.family: late_fusion with model.fusion.kind: merged")
        masks = self.make_masks(batch, model)
        visible, keep, present = {}, {}, {}
        for m in self.modalities:
            x = batch.inputs[m]
            drawn = masks[m]
            n_visible = drawn.shape[1] - host_row_counts(drawn)[0]
            filled = to_device(visible_slots(drawn, n_visible), _device(x))  # False: a padded row's filler slot
            mask = masks[m] = to_device(drawn, _device(x))
            features = model.encode_masked(m, x, mask, visible=n_visible)
            visible[m] = features[:, features.shape[1] - n_visible:]
            present[m] = presence(outputs, batch, m, mask.shape[0], mask.device)
            keep[m] = present[m][:, None] & filled
        preds = self.decoder(fuse_joint(visible, keep), masks, self.grids, present)
        terms, total = {}, None
        for m in self.modalities:
            loss = mae_loss(preds[m], model.target(m, batch.inputs[m]), masks[m] & present[m][:, None],
                            norm_pix=self.cfg.norm_pix_loss, global_norm=self.cfg.global_norm)
            terms[f"mse_{m}"] = loss.detach()
            total = loss if total is None else total + loss
        assert total is not None
        return LossOutput(loss=total, terms=terms)

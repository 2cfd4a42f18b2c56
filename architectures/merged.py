"""Merged-attention fusion: one transformer over the concatenation of every modality's tokens (FLAVA's multimodal
encoder, Singh et al. 2022; CAV-MAE's joint layer, Gong et al. 2023; the "merged attention" co-attention variant
of METER, Dou et al. 2022).

Each modality's tokens are projected to the fusion width ``F`` by a per-modality linear map whose bias is the
learned modality-type embedding, concatenated in sorted modality order and passed through ``depth`` pre-norm ViT
blocks with a key padding mask (`architectures.layers.blocks.Block`), then a final LayerNorm::

    z = LN(Blocks([W_1 x_1 + t_1; ...; W_k x_k + t_k], keep))

``forward(tokens, token_mask, query)`` returns the query modality's states, aligned with its input tokens (so
masked-token objectives predict at the query's positions, and ``fused[:, 0]`` is the query's own first token, e.g.
the text [CLS], which matching heads read; FLAVA adds a separate fusion [CLS] instead); `joint` returns every
modality's states. A modality absent for a row contributes only masked keys, and a modality not given contributes
nothing, so each row's output depends on its real tokens only; a row with no real token at all gets no attention
update (finite, meaningless outputs, never NaN).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.layers.blocks import Block, init_vit_weights
from mmssl.architectures.outputs import tower_name


class MergedAttentionFusion(nn.Module):
    """See the module docstring."""

    def __init__(self, token_dims: Mapping[str, int], width: int = 256, depth: int = 2, heads: int = 4,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if len(token_dims) < 2:
            raise ArchitectureError(f"model.fusion (merged) needs at least two modalities, got {sorted(token_dims)}")
        if width % heads:
            raise ArchitectureError(f"model.fusion.width={width} must be divisible by model.fusion.heads={heads}")
        if depth < 1:
            raise ArchitectureError(f"model.fusion.depth must be >= 1, got {depth}")
        self.width = width
        self.inputs = nn.ModuleDict({m: nn.Linear(d, width) for m, d in sorted(token_dims.items())})
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.apply(init_vit_weights)

    def joint(self, tokens: Mapping[str, Tensor], token_mask: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every given modality's fused states ``[B, T_m, F]``."""
        names = sorted(tokens)
        unknown = [m for m in names if tower_name(m) not in self.inputs]
        if unknown:
            raise ArchitectureError(f"fusion has no input for modality {unknown[0]!r} (built for "
                                    f"{sorted(self.inputs)})")
        parts = [self.inputs[tower_name(m)](tokens[m]) for m in names]
        ref = parts[0]
        keeps = [token_mask.get(m) if token_mask.get(m) is not None else
                 torch.ones(tokens[m].shape[:2], dtype=torch.bool, device=ref.device) for m in names]
        lengths = [p.shape[1] for p in parts]
        x, keep = torch.cat(parts, dim=1), torch.cat(keeps, dim=1)
        for block in self.blocks:
            x = block(x, keep)
        return dict(zip(names, self.norm(x).split(lengths, dim=1), strict=True))

    def forward(self, tokens: Mapping[str, Tensor], token_mask: Mapping[str, Tensor], query: str) -> Tensor:
        if query not in tokens:
            raise ArchitectureError(f"fusion query modality {query!r} is not among the tokens given "
                                    f"({sorted(tokens)})")
        return self.joint(tokens, token_mask)[query]

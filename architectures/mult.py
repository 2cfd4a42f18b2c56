"""MulT: directed crossmodal attention (Tsai et al. 2019, "Multimodal Transformer for Unaligned Multimodal Language
Sequences"), generalised to N modalities, plus the token-input checks every fusion operator shares.

Each modality ``m``'s tokens are projected to the fusion width ``F`` and given learned 1D positions:
``Z_m = X_m W_m + b_m + P_m[:T_m]``. For the query (target) modality ``β`` and every source ``α ≠ β`` a crossmodal
transformer ``CM_{α→β}`` of ``depth`` pre-norm layers (`architectures.layers.blocks.Block`, cross-attention only)
refines the target stream ``Z = Z_β``::

    Z = Z + CrossAttn(LN(Z), LN(Z_α))        (queries from β, keys/values from α's tokens; α's padding masked)
    Z = Z + MLP(LN(Z))

The source streams are concatenated on the feature axis, ``H = [Z_{α_1→β}; ...; Z_{α_{M-1}→β}]`` (sources in sorted
order, width ``(M-1)·F``), refined by a pre-norm self-attention transformer of ``self_depth`` layers over β's tokens
(β's padding masked), and projected back: ``out = LN(H) W_o + b_o`` -> ``[B, T_β, F]``.

Padding tokens are zeroed before the input projection and masked as attention keys, so their values (even NaN)
never reach a real position's output.

Absent convention: a source that is absent for a row (its token mask all False) contributes no attention update
for that row (the attention's zero update for a row without keys, never NaN): that row's ``Z_{α→β}`` is β's stream
passed through the layers' MLPs only. A source modality that is not given at all is treated as absent for every
row, so a row's output with an absent source equals its output computed without that source.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

import torch
from torch import Tensor, nn

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.layers.blocks import Block
from mmssl.architectures.outputs import tower_name

FusionInputs = dict[str, tuple[Tensor, Tensor]]  # tower name -> (tokens [B, T, D], real-token mask bool[B, T])


def collect_fusion_inputs(tokens: Mapping[str, Tensor], token_mask: Mapping[str, Tensor], query: str,
                          known: Collection[str]) -> FusionInputs:
    """Check a fusion call's tokens and key them by tower name (``"audio@1" -> "audio"``).

    A missing mask means every token is real. Raises `ArchitectureError` when fewer than two modalities are given,
    ``query`` is not among them, a key names no modality of ``known``, two keys name the same tower, or shapes or
    batch sizes disagree.
    """
    given = sorted(tokens)
    if len(given) < 2:
        raise ArchitectureError(f"fusion needs tokens of at least two modalities, got {given}")
    if query not in tokens:
        raise ArchitectureError(f"fusion query modality {query!r} is not among the tokens given ({given})")
    out: FusionInputs = {}
    keys: dict[str, str] = {}
    batch = tokens[query].shape[0]
    for key in given:
        x, name = tokens[key], tower_name(key)
        if name not in known:
            raise ArchitectureError(f"fusion got tokens for {key!r}, but model.fusion was built for modalities "
                                    f"{sorted(known)}")
        if name in keys:
            raise ArchitectureError(f"fusion got two token sets for modality {name!r}: {keys[name]!r} and {key!r}")
        if x.ndim != 3 or x.shape[0] != batch:
            raise ArchitectureError(f"fusion tokens[{key!r}] must be [B={batch}, T, D], got {tuple(x.shape)}")
        mask = token_mask.get(key)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        elif tuple(mask.shape) != tuple(x.shape[:2]):
            raise ArchitectureError(f"fusion token_mask[{key!r}] has shape {tuple(mask.shape)}, "
                                    f"tokens {tuple(x.shape[:2])}")
        keys[name] = key
        out[name] = (x, mask.bool())
    return out


def check_positive(**values: float | None) -> None:
    """Raise `ArchitectureError` naming ``model.fusion.<key>`` for a value that is not >= 1 (None is allowed)."""
    for key, value in values.items():
        if value is not None and value < 1:
            raise ArchitectureError(f"model.fusion.{key} must be >= 1, got {value}")


class MulT(nn.Module):
    """``forward(tokens, token_mask, query) -> [B, T_query, width]`` (see the module docstring).

    ``queries`` limits the target modalities the module is built for (default: every modality), so a model that
    only ever fuses into one modality holds no unused crossmodal transformers.
    """

    def __init__(self, token_dims: Mapping[str, int], width: int = 256, depth: int = 2, heads: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, self_depth: int = 2, max_len: int = 1024,
                 queries: Iterable[str] | None = None) -> None:
        super().__init__()
        check_positive(width=width, depth=depth, heads=heads, self_depth=self_depth, max_len=max_len)
        if len(token_dims) < 2:
            raise ArchitectureError(f"model.fusion needs at least two modalities, got {sorted(token_dims)}")
        if width % heads:
            raise ArchitectureError(f"model.fusion.width={width} must be divisible by model.fusion.heads={heads}")
        self.modalities = tuple(sorted(token_dims))
        self.queries = tuple(sorted(queries)) if queries is not None else self.modalities
        unknown = [q for q in self.queries if q not in token_dims]
        if unknown or not self.queries:
            raise ArchitectureError(f"model.fusion.queries={list(self.queries)} must name modalities among "
                                    f"{list(self.modalities)}")
        self.width, self.max_len = width, max_len
        self.inputs = nn.ModuleDict({m: nn.Linear(token_dims[m], width) for m in self.modalities})
        self.positions = nn.ParameterDict({m: nn.Parameter(torch.zeros(max_len, width)) for m in self.modalities})
        for table in self.positions.values():
            nn.init.trunc_normal_(table, std=0.02)
        drops = {"attn_drop": dropout, "mlp_drop": dropout}
        self.crossmodal = nn.ModuleDict({
            self.pair_key(a, b): nn.ModuleList(Block(width, heads, mlp_ratio, self_attention=False, context_dim=width,
                                                     **drops) for _ in range(depth))
            for b in self.queries for a in self.modalities if a != b})
        memory_width = (len(self.modalities) - 1) * width
        self.memory = nn.ModuleDict({
            b: nn.ModuleList(Block(memory_width, heads, mlp_ratio, **drops) for _ in range(self_depth))
            for b in self.queries})
        self.norm = nn.ModuleDict({b: nn.LayerNorm(memory_width) for b in self.queries})
        self.output = nn.ModuleDict({b: nn.Linear(memory_width, width) for b in self.queries})

    @staticmethod
    def pair_key(source: str, target: str) -> str:
        return f"{source}_to_{target}"

    def no_weight_decay(self) -> set[str]:
        return {f"positions.{m}" for m in self.modalities}

    def embed(self, modality: str, x: Tensor, mask: Tensor) -> Tensor:
        """``Z_m = X_m W_m + b_m + P_m[:T]``, padding tokens zeroed first (so even NaN padding cannot leak)."""
        if x.shape[1] > self.max_len:
            raise ArchitectureError(f"fusion got {x.shape[1]} tokens of {modality!r}, more than "
                                    f"model.fusion.max_len={self.max_len}")
        x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        return self.inputs[modality](x) + self.positions[modality][: x.shape[1]]

    def forward(self, tokens: Mapping[str, Tensor], token_mask: Mapping[str, Tensor], query: str) -> Tensor:
        inputs = collect_fusion_inputs(tokens, token_mask, query, self.modalities)
        target = tower_name(query)
        if target not in self.queries:
            raise ArchitectureError(f"fusion query {query!r} is not among model.fusion.queries={list(self.queries)}")
        target_tokens, target_mask = inputs[target]
        z_target = self.embed(target, target_tokens, target_mask)
        streams = []
        for source in self.modalities:
            if source == target:
                continue
            z, context, context_mask = z_target, None, target_mask
            if source in inputs:
                context_mask = inputs[source][1]
                context = self.embed(source, inputs[source][0], context_mask)
            for layer in self.crossmodal[self.pair_key(source, target)]:
                z = layer(z, context=context, context_mask=context_mask)  # no context: the MLP only
            streams.append(z)
        h = torch.cat(streams, dim=-1)
        for layer in self.memory[target]:
            h = layer(h, target_mask)
        return self.output[target](self.norm[target](h))

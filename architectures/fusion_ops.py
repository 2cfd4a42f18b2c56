"""Late-fusion operators on pooled modality vectors, and the registry of every operator fusion (MulT included).

Each vector fusion pools modality ``m``'s tokens by a masked mean over its real tokens, ``h_m = Σ_t mask_t x_t /
max(1, Σ_t mask_t)`` (``[B, D_m]``), fuses the vectors of every modality it was built for (in sorted name order)
and returns one token ``[B, 1, width]``:

- `ConcatFusion` (early-concat late fusion baseline): ``z = W_2 GELU(W_1 [h_1; ...; h_M] + b_1) + b_2``.
- `TensorFusion` (TFN, Zadeh et al. 2017): ``z = W vec(⊗_m [h_m; 1]) + b``.
- `LowRankFusion` (LMF, Liu et al. 2018): ``z = Σ_{r=1..R} ∘_m (W_m^{(r)} [h_m; 1]) + b``.
- `GatedFusion` (Gated Multimodal Unit, Arevalo et al. 2017, for M modalities): ``u_m = tanh(W_m h_m + c_m)``,
  gates ``g = softmax_m(W_g [h_1; ...; h_M] + b_g)`` (or independent sigmoids), ``z = Σ_m g_m ⊙ u_m``.
- `MultiplicativeFusion` (multiplicative interactions, Jayakumar et al. 2020):
  ``z = q^T 𝕎 c + U q + V c + b`` between the query vector and the mean of the other modalities' vectors.

Absent convention: a modality that is absent for a row (its token mask all False) pools to the zero vector
``h_m = 0``, and a modality the fusion was built for but not given in the call is absent for every row. Beyond
that zero vector nothing depends on presence, so an absent row's output equals the output with ``h_m = 0``.
Everything is row-wise (no batch statistics).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.fusion import CrossAttentionFusion
from mmssl.architectures.merged import MergedAttentionFusion
from mmssl.architectures.mult import MulT, check_positive, collect_fusion_inputs
from mmssl.architectures.outputs import tower_name


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """``[B, T, D] -> [B, D]``: the mean over tokens where ``mask`` is True; a row with none is the zero vector.
    Padding values never reach the result (not even NaN ones)."""
    kept = torch.where(mask[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
    return kept.sum(1) / mask.sum(1, keepdim=True).clamp_min(1).to(tokens.dtype)


def augment_one(vector: Tensor) -> Tensor:
    """``[B, d] -> [B, d + 1]``: ``[h; 1]``."""
    return torch.cat([vector, vector.new_ones(vector.shape[0], 1)], dim=1)


def tensor_fusion(vectors: Sequence[Tensor]) -> Tensor:
    """``vec(⊗_m [h_m; 1])`` per row, ``[B, Π_m (d_m + 1)]``, flattened row-major (the first vector's index varies
    slowest, as in ``np.kron``)."""
    fused = augment_one(vectors[0])
    for vector in vectors[1:]:
        fused = (fused[:, :, None] * augment_one(vector)[:, None, :]).flatten(1)
    return fused


def low_rank_fusion(vectors: Sequence[Tensor], factors: Sequence[Tensor], bias: Tensor) -> Tensor:
    """``Σ_r ∘_m (W_m^{(r)} [h_m; 1]) + b`` with ``factors[m]`` of shape ``[R, d_m + 1, width]`` -> ``[B, width]``."""
    product: Tensor | None = None
    for vector, factor in zip(vectors, factors, strict=True):
        projected = torch.einsum("bd,rdw->brw", augment_one(vector), factor)
        product = projected if product is None else product * projected
    assert product is not None
    return product.sum(1) + bias


class VectorFusion(nn.Module):
    """Base: pool each modality's tokens to ``h_m`` and fuse the vectors with `fuse_vectors`."""

    def __init__(self, token_dims: Mapping[str, int], width: int) -> None:
        super().__init__()
        if len(token_dims) < 2:
            raise ArchitectureError(f"model.fusion needs at least two modalities, got {sorted(token_dims)}")
        check_positive(width=width, **{f"token_dims[{m}]": d for m, d in token_dims.items()})
        self.modalities = tuple(sorted(token_dims))
        self.dims = [int(token_dims[m]) for m in self.modalities]
        self.width = width

    def pooled(self, tokens: Mapping[str, Tensor], token_mask: Mapping[str, Tensor], query: str) -> list[Tensor]:
        """``h_m`` for every modality in sorted order; zero vectors for modalities not given."""
        inputs = collect_fusion_inputs(tokens, token_mask, query, self.modalities)
        like = inputs[tower_name(query)][0]
        return [masked_mean(*inputs[m]) if m in inputs else like.new_zeros(like.shape[0], d)
                for m, d in zip(self.modalities, self.dims, strict=True)]

    def forward(self, tokens: Mapping[str, Tensor], token_mask: Mapping[str, Tensor], query: str) -> Tensor:
        return self.fuse_vectors(self.pooled(tokens, token_mask, query), tower_name(query)).unsqueeze(1)

    def fuse_vectors(self, vectors: Sequence[Tensor], query: str) -> Tensor:
        """``[B, d_m]`` vectors in sorted modality order -> ``[B, width]``."""
        raise NotImplementedError


class ConcatFusion(VectorFusion):
    """``z = W_2 GELU(W_1 [h_1; ...; h_M] + b_1) + b_2``, hidden width = ``width``."""

    def __init__(self, token_dims: Mapping[str, int], width: int = 256) -> None:
        super().__init__(token_dims, width)
        self.mlp = nn.Sequential(nn.Linear(sum(self.dims), width), nn.GELU(), nn.Linear(width, width))

    def fuse_vectors(self, vectors: Sequence[Tensor], query: str) -> Tensor:
        return self.mlp(torch.cat(list(vectors), dim=1))


class TensorFusion(VectorFusion):
    """TFN: ``z = W vec(⊗_m [h'_m; 1]) + b`` with ``h'_m = h_m``, or ``h'_m = P_m h_m`` (bias-free, so an absent
    modality still gives ``[0; 1]``) when ``factor_dim`` is set. The outer product has ``Π_m (d'_m + 1)`` features;
    above ``max_features`` the build fails and asks for a ``factor_dim``."""

    def __init__(self, token_dims: Mapping[str, int], width: int = 256, factor_dim: int | None = None,
                 max_features: int = 1 << 16) -> None:
        super().__init__(token_dims, width)
        check_positive(factor_dim=factor_dim, max_features=max_features)
        self.factors = None
        dims = self.dims
        if factor_dim is not None:
            self.factors = nn.ModuleList(nn.Linear(d, factor_dim, bias=False) for d in self.dims)
            dims = [factor_dim] * len(self.dims)
        features = math.prod(d + 1 for d in dims)
        if features > max_features:
            raise ArchitectureError(f"model.fusion.kind='tensor': the outer product of {self.modalities} has "
                                    f"{features} features, more than model.fusion.max_features={max_features}; "
                                    f"set model.fusion.factor_dim (now {factor_dim}) to project each modality first")
        self.out = nn.Linear(features, width)

    def fuse_vectors(self, vectors: Sequence[Tensor], query: str) -> Tensor:
        if self.factors is not None:
            vectors = [f(v) for f, v in zip(self.factors, vectors, strict=True)]
        return self.out(tensor_fusion(vectors))


class LowRankFusion(VectorFusion):
    """LMF: ``z = Σ_{r=1..R} ∘_m (W_m^{(r)} [h_m; 1]) + b``; ``factors[i]`` is ``[R, d_m + 1, width]`` for the i-th
    modality in sorted order. Factor entries start at ``N(0, 1/(d_m + 1))``, so each projection has unit scale."""

    def __init__(self, token_dims: Mapping[str, int], width: int = 256, rank: int = 4) -> None:
        super().__init__(token_dims, width)
        check_positive(rank=rank)
        self.rank = rank
        self.factors = nn.ParameterList(nn.Parameter(torch.randn(rank, d + 1, width) / math.sqrt(d + 1))
                                        for d in self.dims)
        self.bias = nn.Parameter(torch.zeros(width))

    def fuse_vectors(self, vectors: Sequence[Tensor], query: str) -> Tensor:
        return low_rank_fusion(vectors, list(self.factors), self.bias)


class GatedFusion(VectorFusion):
    """GMU for M modalities: ``u_m = tanh(W_m h_m + c_m)``, ``z = Σ_m g_m ⊙ u_m`` with gate logits
    ``l = W_g [h_1; ...; h_M] + b_g`` reshaped ``[M, width]``. ``gate="softmax"`` (default): ``g = softmax_m(l)``
    per feature, a convex combination; for M = 2 it is Arevalo's ``z ⊙ u_1 + (1 - z) ⊙ u_2`` with
    ``z = σ(l_1 - l_2)``. ``gate="sigmoid"``: independent gates ``g_m = σ(l_m)``."""

    GATES = ("softmax", "sigmoid")

    def __init__(self, token_dims: Mapping[str, int], width: int = 256, gate: str = "softmax") -> None:
        super().__init__(token_dims, width)
        if gate not in self.GATES:
            raise ArchitectureError(f"model.fusion.gate must be one of {self.GATES}, got {gate!r}")
        self.gate = gate
        self.unimodal = nn.ModuleList(nn.Linear(d, width) for d in self.dims)
        self.gates = nn.Linear(sum(self.dims), len(self.dims) * width)

    def fuse_vectors(self, vectors: Sequence[Tensor], query: str) -> Tensor:
        units = torch.stack([torch.tanh(f(v)) for f, v in zip(self.unimodal, vectors, strict=True)], dim=1)
        logits = self.gates(torch.cat(list(vectors), dim=1)).view(units.shape)
        gates = logits.softmax(dim=1) if self.gate == "softmax" else logits.sigmoid()
        return (gates * units).sum(1)


class MultiplicativeFusion(VectorFusion):
    """Multiplicative interaction ``z = q^T 𝕎 c + U q + V c + b`` (𝕎: ``[d, width, d]``) between the query
    ``q = P_β h_β`` and the context ``c = (1 / (M - 1)) Σ_{m ≠ β} P_m h_m``: every modality has one bias-free
    projection ``P_m: D_m -> interaction_dim`` used in either role, and the context is the mean over every other
    modality the fusion was built for (absent ones count as zero vectors). With ``rank`` set, 𝕎 is CP-factored:
    ``𝕎[i, k, j] = Σ_r A[i, r] B[r, k] C[j, r]``."""

    def __init__(self, token_dims: Mapping[str, int], width: int = 256, interaction_dim: int = 64,
                 rank: int | None = None) -> None:
        super().__init__(token_dims, width)
        check_positive(interaction_dim=interaction_dim, rank=rank)
        d = interaction_dim
        self.projections = nn.ModuleList(nn.Linear(dim, d, bias=False) for dim in self.dims)
        self.rank = rank
        if rank is None:
            self.weight = nn.Parameter(torch.randn(d, width, d) / d)
        else:  # each factor at unit scale over its summed index, so q^T 𝕎 c has the full tensor's scale
            self.query_factor = nn.Parameter(torch.randn(d, rank) / math.sqrt(d))
            self.output_factor = nn.Parameter(torch.randn(rank, width) / math.sqrt(rank))
            self.context_factor = nn.Parameter(torch.randn(d, rank) / math.sqrt(d))
        self.query_linear = nn.Linear(d, width)  # U q + b
        self.context_linear = nn.Linear(d, width, bias=False)  # V c

    def weight_tensor(self) -> Tensor:
        """The full ``𝕎`` ``[d, width, d]`` (reconstructed from the factors when low-rank)."""
        if self.rank is None:
            return self.weight
        return torch.einsum("ir,rk,jr->ikj", self.query_factor, self.output_factor, self.context_factor)

    def fuse_vectors(self, vectors: Sequence[Tensor], query: str) -> Tensor:
        target = self.modalities.index(query)
        projected = [p(v) for p, v in zip(self.projections, vectors, strict=True)]
        q = projected[target]
        c = torch.stack([x for i, x in enumerate(projected) if i != target]).mean(0)
        if self.rank is None:
            bilinear = torch.einsum("bi,ikj,bj->bk", q, self.weight, c)
        else:
            bilinear = ((q @ self.query_factor) * (c @ self.context_factor)) @ self.output_factor
        return bilinear + self.query_linear(q) + self.context_linear(c)


OPERATOR_FUSIONS: dict[str, type[nn.Module]] = {
    "cross_attention": CrossAttentionFusion,
    "concat": ConcatFusion,
    "tensor": TensorFusion,
    "low_rank": LowRankFusion,
    "gated": GatedFusion,
    "multiplicative": MultiplicativeFusion,
    "mult": MulT,
    "merged": MergedAttentionFusion,
}


def fusion_options(kind: str) -> tuple[str, ...]:
    """The keyword options (besides ``token_dims`` and ``width``) fusion ``kind`` accepts."""
    if kind not in OPERATOR_FUSIONS:
        raise ArchitectureError(f"model.fusion.kind must be one of {sorted(OPERATOR_FUSIONS)}, got {kind!r}")
    params = inspect.signature(OPERATOR_FUSIONS[kind].__init__).parameters
    return tuple(p for p in params if p not in ("self", "token_dims", "width"))


def build_fusion(kind: str, token_dims: Mapping[str, int], width: int, **options: object) -> nn.Module:
    """``OPERATOR_FUSIONS[kind](token_dims, width, **options)``, with errors naming the ``model.fusion`` key."""
    accepted = fusion_options(kind)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ArchitectureError(f"model.fusion.{unknown[0]} is not an option of model.fusion.kind={kind!r} "
                                f"(its options: {list(accepted)})")
    return OPERATOR_FUSIONS[kind](token_dims, width, **options)


SINGLE_TOKEN_FUSIONS = ("concat", "tensor", "low_rank", "gated", "multiplicative")  # fused output: [B, 1, width]

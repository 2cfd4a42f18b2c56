"""Late-fusion operators (architectures/fusion_ops.py, architectures/mult.py) against their formulas and the
fusion contract: row independence, absent modalities, padding, gradients."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.fusion_ops import (
    OPERATOR_FUSIONS,
    ConcatFusion,
    GatedFusion,
    LowRankFusion,
    MultiplicativeFusion,
    TensorFusion,
    VectorFusion,
    build_fusion,
    low_rank_fusion,
    masked_mean,
    tensor_fusion,
)
from mmssl.architectures.mult import MulT

DIMS = {"audio": 3, "image": 2, "text": 4}  # sorted order: audio, image, text
LENGTHS = {"audio": 5, "image": 3, "text": 6}
WIDTH = 8
QUERY = "text"

CASES = {
    "concat": ("concat", {}),
    "tensor": ("tensor", {}),
    "tensor_factor": ("tensor", {"factor_dim": 2}),
    "low_rank": ("low_rank", {"rank": 3}),
    "gated_softmax": ("gated", {}),
    "gated_sigmoid": ("gated", {"gate": "sigmoid"}),
    "multiplicative": ("multiplicative", {"interaction_dim": 3}),
    "multiplicative_rank": ("multiplicative", {"interaction_dim": 3, "rank": 2}),
    "mult": ("mult", {"depth": 2, "heads": 2, "self_depth": 1, "mlp_ratio": 2.0, "max_len": 16}),
}


def build(case: str, seed: int = 0) -> nn.Module:
    kind, options = CASES[case]
    torch.manual_seed(seed)
    return build_fusion(kind, DIMS, WIDTH, **options).eval()


def make_batch(rows: int = 4, seed: int = 0, lengths: Mapping[str, int] = LENGTHS,
               dims: Mapping[str, int] = DIMS) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Random tokens, each row with a random number (>= 1) of real tokens followed by padding."""
    g = torch.Generator().manual_seed(seed)
    tokens, masks = {}, {}
    for m, d in dims.items():
        n = lengths[m]
        tokens[m] = torch.randn(rows, n, d, generator=g)
        real = torch.randint(1, n + 1, (rows,), generator=g)
        masks[m] = torch.arange(n)[None, :] < real[:, None]
    return tokens, masks


def real_outputs(out: Tensor, query_mask: Tensor, row: int) -> Tensor:
    """A row's outputs at its real query positions (vector fusions: their single token)."""
    return out[row] if out.shape[1] == 1 else out[row][query_mask[row]]


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def linear(x: Tensor, layer: nn.Linear) -> Tensor:
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0.0)


# --- formulas ------------------------------------------------------------------------------------------------------


def test_registry_holds_every_kind() -> None:
    from mmssl.architectures.merged import MergedAttentionFusion

    assert set(OPERATOR_FUSIONS) == {"cross_attention", "concat", "tensor", "low_rank", "gated", "multiplicative",
                                     "mult", "merged"}
    assert OPERATOR_FUSIONS["mult"] is MulT
    assert OPERATOR_FUSIONS["merged"] is MergedAttentionFusion


def test_masked_mean_pools_real_tokens_only() -> None:
    tokens, masks = make_batch(rows=5, seed=1)
    x, mask = tokens["audio"].numpy(), masks["audio"].numpy()
    mask[2] = False  # an absent row pools to zero
    expected = np.stack([x[b][mask[b]].mean(0) if mask[b].any() else np.zeros(x.shape[2]) for b in range(5)])
    np.testing.assert_allclose(masked_mean(tokens["audio"], torch.from_numpy(mask)).numpy(), expected, atol=1e-6)


def test_tensor_fusion_is_the_kronecker_product_of_one_augmented_vectors() -> None:
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal((3, d)) for d in (3, 2, 4)]
    aug = [np.concatenate([v, np.ones((3, 1))], axis=1) for v in vectors]
    expected = np.stack([np.kron(np.kron(aug[0][b], aug[1][b]), aug[2][b]) for b in range(3)])
    got = tensor_fusion([torch.from_numpy(v) for v in vectors]).numpy()
    assert got.shape == (3, 4 * 3 * 5)
    np.testing.assert_allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("factor_dim", [None, 2])
def test_tensor_fusion_module_is_a_linear_map_of_the_outer_product(factor_dim: int | None) -> None:
    torch.manual_seed(0)
    fusion = TensorFusion(DIMS, WIDTH, factor_dim=factor_dim).double()
    tokens, masks = make_batch(seed=2)
    tokens = {m: t.double() for m, t in tokens.items()}
    pooled = [masked_mean(tokens[m], masks[m]) for m in sorted(DIMS)]
    if factor_dim is not None:  # bias-free projections P_m h_m first
        pooled = [h @ f.weight.T for h, f in zip(pooled, fusion.factors, strict=True)]
    outer = torch.einsum("ba,bi,bt->bait", *[torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
                                             for h in pooled]).flatten(1)
    expected = outer @ fusion.out.weight.T + fusion.out.bias
    torch.testing.assert_close(fusion(tokens, masks, QUERY)[:, 0], expected)


def test_low_rank_fusion_with_an_exact_cp_decomposition_reproduces_tensor_fusion() -> None:
    torch.manual_seed(0)
    tfn = TensorFusion(DIMS, WIDTH)
    (da, di, dt) = (DIMS[m] + 1 for m in sorted(DIMS))
    weight = tfn.out.weight.detach().view(WIDTH, da, di, dt)
    # W[k, a, i, t] = Σ_{r=(j, s)} A_r[k, a] · [i = j] · [t = s]: rank di·dt, exact.
    rank = di * dt
    lmf = LowRankFusion(DIMS, WIDTH, rank=rank)
    factors = [torch.zeros(rank, d, WIDTH) for d in (da, di, dt)]
    for j in range(di):
        for s in range(dt):
            r = j * dt + s
            factors[0][r] = weight[:, :, j, s].T
            factors[1][r, j] = 1.0
            factors[2][r, s] = 1.0
    with torch.no_grad():
        for param, value in zip(lmf.factors, factors, strict=True):
            param.copy_(value)
        lmf.bias.copy_(tfn.out.bias)
    tokens, masks = make_batch(rows=6, seed=3)
    masks["image"][1] = False  # an absent modality row too
    torch.testing.assert_close(lmf(tokens, masks, QUERY), tfn(tokens, masks, QUERY), atol=1e-5, rtol=1e-5)


def test_low_rank_fusion_equals_an_explicit_loop_over_rank() -> None:
    lmf = build("low_rank")
    tokens, masks = make_batch(seed=4)
    vectors = [masked_mean(tokens[m], masks[m]) for m in sorted(DIMS)]
    expected = torch.zeros(4, WIDTH)
    for b in range(4):
        for r in range(lmf.rank):
            term = torch.ones(WIDTH)
            for v, factor in zip(vectors, lmf.factors, strict=True):
                term = term * (factor[r].T @ torch.cat([v[b], torch.ones(1)]))
            expected[b] += term
        expected[b] += lmf.bias
    with torch.no_grad():
        torch.testing.assert_close(lmf(tokens, masks, QUERY)[:, 0], expected)
        torch.testing.assert_close(low_rank_fusion(vectors, list(lmf.factors), lmf.bias), expected)


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_gated_fusion_equals_its_formula(gate: str) -> None:
    torch.manual_seed(0)
    fusion = GatedFusion(DIMS, WIDTH, gate=gate)
    tokens, masks = make_batch(seed=5)
    vectors = [masked_mean(tokens[m], masks[m]) for m in sorted(DIMS)]
    units = [torch.tanh(linear(v, f)) for v, f in zip(vectors, fusion.unimodal, strict=True)]
    logits = linear(torch.cat(vectors, 1), fusion.gates)
    chunks = [logits[:, i * WIDTH:(i + 1) * WIDTH] for i in range(3)]
    if gate == "softmax":
        total = sum(torch.exp(c) for c in chunks)
        gates = [torch.exp(c) / total for c in chunks]
    else:
        gates = [1.0 / (1.0 + torch.exp(-c)) for c in chunks]
    expected = sum(g * u for g, u in zip(gates, units, strict=True))
    with torch.no_grad():
        torch.testing.assert_close(fusion(tokens, masks, QUERY)[:, 0], expected)


def test_two_modality_softmax_gate_is_arevalos_gmu() -> None:
    torch.manual_seed(0)
    dims = {"audio": 3, "text": 4}
    fusion = GatedFusion(dims, WIDTH)
    tokens, masks = make_batch(seed=6, dims=dims)
    va, vt = (masked_mean(tokens[m], masks[m]) for m in ("audio", "text"))
    logits = linear(torch.cat([va, vt], 1), fusion.gates)
    z = torch.sigmoid(logits[:, :WIDTH] - logits[:, WIDTH:])
    expected = z * torch.tanh(linear(va, fusion.unimodal[0])) + (1 - z) * torch.tanh(linear(vt, fusion.unimodal[1]))
    with torch.no_grad():
        torch.testing.assert_close(fusion(tokens, masks, "text")[:, 0], expected)


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("query", ["audio", "text"])
def test_multiplicative_fusion_equals_the_three_way_einsum(rank: int | None, query: str) -> None:
    torch.manual_seed(0)
    fusion = MultiplicativeFusion(DIMS, WIDTH, interaction_dim=3, rank=rank)
    tokens, masks = make_batch(seed=7)
    p = {m: (masked_mean(tokens[m], masks[m]) @ proj.weight.T).detach().numpy()
         for m, proj in zip(sorted(DIMS), fusion.projections, strict=True)}
    q = p[query]
    c = np.mean([p[m] for m in DIMS if m != query], axis=0)
    if rank is None:
        w = fusion.weight.detach().numpy()
    else:
        a, b, cf = (t.detach().numpy() for t in (fusion.query_factor, fusion.output_factor, fusion.context_factor))
        w = np.einsum("ir,rk,jr->ikj", a, b, cf)
    u, v = fusion.query_linear, fusion.context_linear
    expected = (np.einsum("bi,ikj,bj->bk", q, w, c) + q @ u.weight.detach().numpy().T + u.bias.detach().numpy()
                + c @ v.weight.detach().numpy().T)
    assert w.shape == (3, WIDTH, 3)
    np.testing.assert_allclose(fusion(tokens, masks, query)[:, 0].detach().numpy(), expected, atol=1e-5)


def test_concat_fusion_is_an_mlp_of_the_concatenation() -> None:
    torch.manual_seed(0)
    fusion = ConcatFusion(DIMS, WIDTH)
    tokens, masks = make_batch(seed=8)
    x = torch.cat([masked_mean(tokens[m], masks[m]) for m in sorted(DIMS)], 1)
    first, last = fusion.mlp[0], fusion.mlp[2]
    assert first.weight.shape == (WIDTH, sum(DIMS.values()))
    expected = linear(gelu(linear(x, first)), last)
    with torch.no_grad():
        torch.testing.assert_close(fusion(tokens, masks, QUERY)[:, 0], expected)


def test_single_layer_mult_equals_hand_computed_attention() -> None:
    """Two modalities, one crossmodal and one self-attention layer, two heads; each row computed on its real
    tokens only (padding sliced away rather than masked)."""
    dims, heads = {"image": 2, "text": 3}, 2
    torch.manual_seed(0)
    mult = MulT(dims, width=4, depth=1, heads=heads, self_depth=1, mlp_ratio=1.5, max_len=8)
    tokens, masks = make_batch(rows=3, seed=9, lengths={"image": 4, "text": 5}, dims=dims)

    def norm(x: Tensor, ln: nn.LayerNorm) -> Tensor:
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias

    def attention(x: Tensor, ctx: Tensor, att: nn.Module) -> Tensor:
        q, (k, v) = linear(x, att.q), linear(ctx, att.kv).chunk(2, dim=1)  # kv: the keys' rows, then the values'
        dh = q.shape[1] // heads
        outs = []
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            scores = q[:, sl] @ k[:, sl].T / math.sqrt(dh)
            weights = torch.exp(scores - scores.max(1, keepdim=True).values)
            outs.append(weights / weights.sum(1, keepdim=True) @ v[:, sl])
        return linear(torch.cat(outs, 1), att.proj)

    def mlp(x: Tensor, block: nn.Module) -> Tensor:
        return linear(gelu(linear(x, block.fc1)), block.fc2)

    out = mult(tokens, masks, "text")
    assert out.shape == (3, 5, 4)
    for b in range(3):
        xt, xi = tokens["text"][b][masks["text"][b]], tokens["image"][b][masks["image"][b]]
        zt = linear(xt, mult.inputs["text"]) + mult.positions["text"][: len(xt)]
        zi = linear(xi, mult.inputs["image"]) + mult.positions["image"][: len(xi)]
        cm = mult.crossmodal["image_to_text"][0]
        z = zt + attention(norm(zt, cm.norm_cross), norm(zi, cm.norm_context), cm.cross_attn)
        z = z + mlp(norm(z, cm.norm2), cm.mlp)
        sa = mult.memory["text"][0]
        h = norm(z, sa.norm1)
        z = z + attention(h, h, sa.attn)
        z = z + mlp(norm(z, sa.norm2), sa.mlp)
        expected = linear(norm(z, mult.norm["text"]), mult.output["text"])
        with torch.no_grad():
            torch.testing.assert_close(out[b][masks["text"][b]], expected)


# --- the fusion contract, for every kind ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_outputs_of_a_row_do_not_depend_on_other_rows(case: str) -> None:
    fusion = build(case)
    tokens, masks = make_batch(seed=10)
    other_tokens, other_masks = make_batch(seed=11)
    other_masks["audio"][2] = False  # other rows change, one of them losing a modality
    for m in DIMS:
        other_tokens[m][0], other_masks[m][0] = tokens[m][0], masks[m][0]
    with torch.no_grad():
        a, b = fusion(tokens, masks, QUERY), fusion(other_tokens, other_masks, QUERY)
        single = fusion({m: t[:1] for m, t in tokens.items()}, {m: k[:1] for m, k in masks.items()}, QUERY)
    assert not torch.allclose(a[1:], b[1:])
    torch.testing.assert_close(real_outputs(a, masks[QUERY], 0), real_outputs(b, masks[QUERY], 0))
    torch.testing.assert_close(real_outputs(a, masks[QUERY], 0), real_outputs(single, masks[QUERY], 0))


@pytest.mark.parametrize("case", CASES)
def test_an_absent_modality_row_is_finite_and_follows_the_absent_convention(case: str) -> None:
    fusion = build(case)
    tokens, masks = make_batch(seed=12)
    tokens["image"][1] = 1e4  # garbage under an all-False mask
    masks["image"][1] = False
    masks["audio"][3] = False
    with torch.no_grad():
        out = fusion(tokens, masks, QUERY)
        without_image = fusion({m: tokens[m] for m in ("audio", "text")},
                               {m: masks[m] for m in ("audio", "text")}, QUERY)
        assert torch.isfinite(out).all()
        # a modality not given is absent for every row: the absent row matches it
        torch.testing.assert_close(real_outputs(out, masks[QUERY], 1), real_outputs(without_image, masks[QUERY], 1))
        assert not torch.allclose(real_outputs(out, masks[QUERY], 0), real_outputs(without_image, masks[QUERY], 0))
        if isinstance(fusion, VectorFusion):  # absent == the modality's vector set to zero
            zeroed_tokens, zeroed_masks = dict(tokens), dict(masks)
            zeroed_tokens["image"], zeroed_masks["image"] = tokens["image"].clone(), masks["image"].clone()
            zeroed_tokens["image"][1], zeroed_masks["image"][1] = 0.0, True
            zeroed = fusion(zeroed_tokens, zeroed_masks, QUERY)
            torch.testing.assert_close(out, zeroed)
        masks[QUERY][2] = False  # even an absent query row stays finite
        assert torch.isfinite(fusion(tokens, masks, QUERY)).all()


@pytest.mark.parametrize("case", CASES)
def test_padding_tokens_do_not_change_outputs(case: str) -> None:
    fusion = build(case)
    tokens, masks = make_batch(seed=13)
    padded_tokens, padded_masks = {}, {}
    for m, t in tokens.items():
        extra = torch.full((t.shape[0], 2, t.shape[2]), float("nan"))
        garbage = torch.where(masks[m][..., None], t, torch.full_like(t, -3e3))
        padded_tokens[m] = torch.cat([garbage, extra], 1)
        padded_masks[m] = torch.cat([masks[m], torch.zeros(t.shape[0], 2, dtype=torch.bool)], 1)
    with torch.no_grad():
        a, b = fusion(tokens, masks, QUERY), fusion(padded_tokens, padded_masks, QUERY)
    for row in range(4):
        torch.testing.assert_close(real_outputs(a, masks[QUERY], row), real_outputs(b, padded_masks[QUERY], row))


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_every_parameter(case: str) -> None:
    fusion = build(case).train()
    tokens, masks = make_batch(seed=14)
    queries = getattr(fusion, "queries", (QUERY,))
    torch.manual_seed(1)
    loss = sum((fusion(tokens, masks, q) * torch.randn(4, LENGTHS[q] if isinstance(fusion, MulT) else 1, WIDTH))
               .sum() for q in queries)
    loss.backward()
    for name, param in fusion.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("case", CASES)
def test_view_names_map_to_their_modality(case: str) -> None:
    fusion = build(case)
    tokens, masks = make_batch(seed=15)
    with torch.no_grad():
        plain = fusion(tokens, masks, QUERY)
        views = fusion({"audio@1": tokens["audio"], "text": tokens["text"], "image": tokens["image"]},
                       {"audio@1": masks["audio"], "text": masks["text"], "image": masks["image"]}, QUERY)
        as_query = fusion({"text@1": tokens["text"], "audio": tokens["audio"], "image": tokens["image"]},
                          {"text@1": masks["text"], "audio": masks["audio"], "image": masks["image"]}, "text@1")
    torch.testing.assert_close(plain, views)
    torch.testing.assert_close(plain, as_query)


def test_mult_restricted_to_one_query_holds_only_its_transformers() -> None:
    mult = MulT(DIMS, width=4, depth=1, heads=2, self_depth=1, max_len=8, queries=["text"])
    assert set(mult.crossmodal) == {"audio_to_text", "image_to_text"} and set(mult.memory) == {"text"}
    tokens, masks = make_batch(seed=16)
    with pytest.raises(ArchitectureError, match=r"model\.fusion\.queries"):
        mult(tokens, masks, "audio")


# --- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_bad_token_sets_raise(case: str) -> None:
    fusion = build(case)
    tokens, masks = make_batch(seed=17)
    with pytest.raises(ArchitectureError, match=r"at least two modalities.*'text'"):
        fusion({"text": tokens["text"]}, {"text": masks["text"]}, "text")
    with pytest.raises(ArchitectureError, match="'video'"):
        fusion({**tokens, "video": tokens["audio"]}, masks, QUERY)
    with pytest.raises(ArchitectureError, match="'audio@1'"):
        fusion({**tokens, "audio@1": tokens["audio"]}, masks, QUERY)
    with pytest.raises(ArchitectureError, match="query modality 'depth'"):
        fusion(tokens, masks, "depth")


def test_build_errors_name_the_config_key() -> None:
    with pytest.raises(ArchitectureError, match=r"model\.fusion\.kind.*'bilinear'"):
        build_fusion("bilinear", DIMS, WIDTH)
    with pytest.raises(ArchitectureError, match=r"model\.fusion\.depth"):
        build_fusion("concat", DIMS, WIDTH, depth=2)
    with pytest.raises(ArchitectureError, match=r"model\.fusion\.factor_dim"):
        TensorFusion({"audio": 300, "text": 300}, WIDTH)
    with pytest.raises(ArchitectureError, match=r"model\.fusion\.gate.*'relu'"):
        GatedFusion(DIMS, WIDTH, gate="relu")
    with pytest.raises(ArchitectureError, match=r"model\.fusion\.rank"):
        LowRankFusion(DIMS, WIDTH, rank=0)
    with pytest.raises(ArchitectureError, match=r"model\.fusion\.heads=3"):
        MulT(DIMS, width=8, heads=3)
    with pytest.raises(ArchitectureError, match="at least two modalities"):
        ConcatFusion({"text": 4}, WIDTH)
    mult = MulT(DIMS, width=4, heads=2, depth=1, self_depth=1, max_len=4)
    tokens, masks = make_batch(seed=18)
    with pytest.raises(ArchitectureError, match=r"6 tokens of 'text'.*model\.fusion\.max_len=4"):
        mult(tokens, masks, QUERY)

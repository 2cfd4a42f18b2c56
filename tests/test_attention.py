"""The one attention, block and Perceiver (architectures/layers) against independent references.

The attention against ``softmax(Q Kᵀ/√d + M) V`` written out per head in float64 (key masks, general patterns,
causal, cross-attention with another context width and an inner width of its own) and against torch's
``nn.MultiheadAttention`` with copied weights; rows without keys give an exact zero update and finite, zero
gradients; padding values (inf, NaN) reach no real output or gradient. The block's options (gates, experts,
cross-only) and the Perceiver in both modes (HighMMT: keys are the inputs; Flamingo: keys are [inputs; latents],
input projection, final LayerNorm) against their formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.layers.attention import Attention
from mmssl.architectures.layers.blocks import Block
from mmssl.architectures.layers.perceiver import Perceiver

TOL = {"rtol": 1e-10, "atol": 1e-10}  # float64 against float64


def reference(attn: Attention, x: Tensor, c: Tensor, allowed: Tensor) -> Tensor:
    """``W_o concat_h softmax(q_h k_hᵀ/√d + M) v_h + b_o`` per head, ``M = -inf`` where ``allowed`` ``[B, T, S]``
    is False; a row with no allowed key is 0 (the convention under test)."""
    h, d = attn.heads, attn.head_dim
    q = x @ attn.q.weight.T + (attn.q.bias if attn.q.bias is not None else 0)
    kv = c @ attn.kv.weight.T + (attn.kv.bias if attn.kv.bias is not None else 0)
    k, v = kv[..., : h * d], kv[..., h * d:]
    heads = []
    for i in range(h):
        sl = slice(i * d, (i + 1) * d)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        heads.append(torch.nan_to_num(weights, nan=0.0) @ v[..., sl])
    out = torch.cat(heads, -1) @ attn.proj.weight.T + (attn.proj.bias if attn.proj.bias is not None else 0)
    return out * allowed.any(-1, keepdim=True)


def _attention(*args, seed: int = 0, **kwargs) -> Attention:
    torch.manual_seed(seed)
    return Attention(*args, **kwargs).double().eval()


def _randn(*shape: int, seed: int = 1) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


KEY_MASK = torch.tensor([[1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("case", ["self", "self_causal", "cross_kdim", "cross_head_dim_no_bias"])
def test_attention_equals_the_formula_under_every_mask(case: str) -> None:
    cross = case.startswith("cross")
    attn = _attention(12, 3, context_dim=10 if cross else None, head_dim=5 if "head_dim" in case else None,
                      bias="no_bias" not in case, causal=case == "self_causal")
    x = _randn(3, 4 if cross else 6, 12)
    c = _randn(3, 6, 10, seed=2) if cross else x
    t, s = x.shape[1], 6
    causal = torch.ones(t, s, dtype=torch.bool).tril() if case == "self_causal" else torch.ones(t, s, dtype=torch.bool)
    pattern = torch.rand(3, t, s, generator=torch.Generator().manual_seed(3)) < 0.6
    pattern[0, 1] = False  # a query row with no allowed key
    for key_mask, allowed in ((None, None), (KEY_MASK, None), (None, pattern), (KEY_MASK, pattern)):
        with torch.no_grad():
            got = attn(x, None if not cross else c, key_mask=key_mask, allowed=allowed)
        full = causal[None].expand(3, -1, -1).clone()
        if key_mask is not None:
            full &= key_mask[:, None, :]
        if allowed is not None:
            full &= allowed
        torch.testing.assert_close(got, reference(attn, x, c, full), **TOL)


def test_unmasked_and_key_masked_attention_equal_torch_multihead_attention() -> None:
    torch.manual_seed(0)
    ours = Attention(8, 2).double().eval()
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    cross = Attention(8, 2, context_dim=6).double().eval()
    mha_kdim = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True).double().eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.kv.weight]))
        mha.in_proj_bias.copy_(torch.cat([ours.q.bias, ours.kv.bias]))
        mha.out_proj.load_state_dict(ours.proj.state_dict())
        k_weight, v_weight = cross.kv.weight.chunk(2)
        mha_kdim.q_proj_weight.copy_(cross.q.weight)
        mha_kdim.k_proj_weight.copy_(k_weight)
        mha_kdim.v_proj_weight.copy_(v_weight)
        mha_kdim.in_proj_bias.copy_(torch.cat([cross.q.bias, cross.kv.bias]))
        mha_kdim.out_proj.load_state_dict(cross.proj.state_dict())
    x, c = _randn(3, 6, 8), _randn(3, 6, 6, seed=2)
    real = KEY_MASK[:2]  # rows with at least one key (torch gives NaN for a row without)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), mha(x, x, x, need_weights=False)[0], **TOL)
        torch.testing.assert_close(cross(x, c), mha_kdim(x, c, c, need_weights=False)[0], **TOL)
        torch.testing.assert_close(ours(x[:2], key_mask=real),
                                   mha(x[:2], x[:2], x[:2], key_padding_mask=~real, need_weights=False)[0], **TOL)
        torch.testing.assert_close(cross(x[:2], c[:2], key_mask=real),
                                   mha_kdim(x[:2], c[:2], c[:2], key_padding_mask=~real, need_weights=False)[0],
                                   **TOL)


def test_rows_without_keys_get_an_exact_zero_update_and_zero_finite_gradients() -> None:
    attn = _attention(8, 2, context_dim=6).train()
    x, c = _randn(3, 4, 8).requires_grad_(), _randn(3, 5, 6, seed=2).requires_grad_()
    key_mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    allowed = torch.ones(3, 4, 5, dtype=torch.bool)
    allowed[2, 3] = False  # row 2's last query has no key; row 1 has none at all
    out = attn(x, c, key_mask=key_mask, allowed=allowed)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[2, 3], torch.zeros_like(out[2, 3]))
    assert torch.isfinite(out).all() and out[0].abs().min() > 0
    (out[1].sum() + out[2, 3].sum()).backward()  # only the keyless rows: nothing may flow back
    for name, p in [*attn.named_parameters(), ("x", x), ("context", c)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and not p.grad.any(), name


def test_causal_and_key_mask_combine_and_later_tokens_reach_no_earlier_position() -> None:
    attn = _attention(8, 2, causal=True)
    x = _randn(2, 5, 8)
    key_mask = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        base = attn(x, key_mask=key_mask)
        expected = reference(attn, x, x, torch.ones(5, 5, dtype=torch.bool).tril()[None] & key_mask[:, None, :])
        torch.testing.assert_close(base, expected, **TOL)
        for k in range(5):
            changed = x.clone()
            changed[:, k] += 1.0
            out = attn(changed, key_mask=key_mask)
            torch.testing.assert_close(out[:, :k], base[:, :k], rtol=0, atol=0)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 1e30])
def test_padding_values_reach_no_real_output_and_no_gradient(garbage: float) -> None:
    attn = _attention(8, 2, context_dim=6, seed=3)
    x, c = _randn(2, 3, 8), _randn(2, 5, 6, seed=2)
    key_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    dirty = c.clone()
    dirty[~key_mask] = garbage
    outs, grads = [], []
    for context in (c, dirty):
        attn.zero_grad()
        out = attn(x, context, key_mask=key_mask)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in attn.named_parameters()})
    assert torch.equal(outs[0], outs[1])
    for name in grads[0]:
        assert torch.isfinite(grads[1][name]).all() and torch.equal(grads[0][name], grads[1][name]), name


def test_attention_dropout_only_in_training_and_bad_shapes_raise() -> None:
    attn = _attention(8, 2, attn_drop=0.5)
    x = _randn(2, 6, 8)
    with torch.no_grad():
        assert torch.equal(attn(x), attn(x))  # eval: no dropout
        attn.train()
        assert not torch.equal(attn(x), attn(x))
    with pytest.raises(ArchitectureError, match="width 10 is not divisible by heads=4"):
        Attention(10, 4)
    assert sum(p.numel() for p in Attention(12, 3, context_dim=20, head_dim=5, bias=False).parameters()) == (
        12 * 15 + 20 * 30 + 15 * 12)


# --- the block ---------------------------------------------------------------------------------------------------
def test_gated_block_starts_as_the_identity_and_a_missing_context_skips_only_the_cross_attention() -> None:
    torch.manual_seed(0)
    gated = Block(8, 2, self_attention=False, context_dim=6, norm_context=False, gated=True).double()
    x, c = _randn(2, 4, 8), _randn(2, 5, 6, seed=2)
    with torch.no_grad():
        assert torch.equal(gated(x, context=c), x)  # tanh(0) = 0
        gated.cross_gate.fill_(0.5)
        gated.mlp_gate.fill_(-0.25)
        y = x + math.tanh(0.5) * gated.cross_attn(gated.norm_cross(x), c)
        torch.testing.assert_close(gated(x, context=c), y + math.tanh(-0.25) * gated.mlp(gated.norm2(y)), **TOL)
        cross = Block(8, 2, self_attention=False, context_dim=6).double()
        torch.testing.assert_close(cross(x), x + cross.mlp(cross.norm2(x)), **TOL)  # MulT: a source not given
    with pytest.raises(ArchitectureError, match="no cross-attention"):
        Block(8, 2)(x.float(), context=c.float())
    with pytest.raises(ArchitectureError, match="self-attention, cross-attention"):
        Block(8, 2, self_attention=False)


def test_expert_routing_sends_each_segment_to_its_own_mlp_under_shared_attention() -> None:
    torch.manual_seed(0)
    block = Block(8, 2, experts=["audio", "text"]).double().eval()
    x = _randn(2, 5, 8)
    keep = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        out = block(x, keep, route=[("audio", 2), ("text", 3)])
        h = x + block.attn(block.norm1(x), key_mask=keep)
        expected = torch.cat([h[:, :2] + block.mlp["audio"](block.norm2["audio"](h[:, :2])),
                              h[:, 2:] + block.mlp["text"](block.norm2["text"](h[:, 2:]))], 1)
        torch.testing.assert_close(out, expected, **TOL)
    with pytest.raises(ArchitectureError, match="no feed-forward expert 'image'"):
        block(x, route=[("image", 5)])
    with pytest.raises(ArchitectureError, match=r"lengths \[2, 2\] do not cover the 5 tokens"):
        block(x, route=[("audio", 2), ("text", 2)])


# --- the Perceiver -------------------------------------------------------------------------------------------------
def _perceiver_by_formula(p: Perceiver, x: Tensor, keep: Tensor, latents_as_keys: bool) -> Tensor:
    """One block written out: X = W_in x + b, Z + Attn(LN_q(Z), K) with K = LN_c(X) or [LN_c(X); LN_q(Z)], then
    Z + MLP(LN(Z)), then the final LN (an identity when not built)."""
    layer = p.layers[0]
    xs = p.input(x)
    z = p.latents.expand(x.shape[0], -1, -1)
    q = layer.norm_cross(z)
    keys, mask = layer.norm_context(xs), keep
    if latents_as_keys:
        keys = torch.cat([keys, q], 1)
        mask = torch.cat([keep, torch.ones(x.shape[0], z.shape[1], dtype=torch.bool)], 1)
    z = z + reference(layer.cross_attn, q, keys, mask[:, None, :].expand(-1, z.shape[1], -1))
    z = z + layer.mlp.fc2(F.gelu(layer.mlp.fc1(layer.norm2(z))))
    return p.norm(z)


@pytest.mark.parametrize("mode", ["highmmt", "flamingo"])
def test_perceiver_in_both_modes_follows_its_formula_and_honours_the_mask(mode: str) -> None:
    flamingo = mode == "flamingo"
    torch.manual_seed(0)
    p = Perceiver(8, 2, num_latents=3, depth=1, in_dim=6 if flamingo else None, latents_as_keys=flamingo,
                  final_norm=flamingo).double().eval()
    assert isinstance(p.input, nn.Linear) == flamingo and isinstance(p.norm, nn.LayerNorm) == flamingo
    x = _randn(3, 5, 6 if flamingo else 8)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        out = p(x, keep)
        assert out.shape == (3, 3, 8) and torch.isfinite(out).all()
        torch.testing.assert_close(out, _perceiver_by_formula(p, x, keep, flamingo), **TOL)
        dirty = x.clone()
        dirty[~keep] = float("nan")
        assert torch.equal(p(dirty, keep), out)  # padding never reaches the latents
        perm = torch.randperm(5, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(p(x[:, perm], keep[:, perm]), out, **TOL)  # no positional term
        if not flamingo:  # a row without inputs: the learned latents through the MLP only
            z = p.latents
            torch.testing.assert_close(out[2], z + p.layers[0].mlp(p.layers[0].norm2(z)), **TOL)

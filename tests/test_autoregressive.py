"""Prefix-LM / captioning: the attention pattern, causality of the decoder, the loss against a float64 loop.

Tolerances: float32 losses against float64 loops within ``rtol=1e-5, atol=1e-5``; logits at positions a change
must not reach within ``atol=1e-6``; gradcheck in float64 with its defaults.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from mmssl.architectures.config import ModelConfig, build_model
from mmssl.architectures.layers.blocks import Block
from mmssl.architectures.modalities import AudioConfig, TextConfig
from mmssl.architectures.modalities.tokenizers import load_tokenizer
from mmssl.data_pipelines.batch import Batch
from mmssl.objectives.autoregressive import (
    PrefixLMConfig,
    PrefixLMDecoder,
    PrefixLMObjective,
    prefix_lm_attention,
    prefix_lm_loss,
)
from mmssl.objectives.base import ObjectiveError
from tests.conftest import PROMPT_WORDS

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def model(spm: Path):
    cfg = ModelConfig(embed_dim=16, towers={
        "audio": AudioConfig(width=32, depth=1, heads=2, frames=32, n_mels=32, patch_size=[8, 8]),
        "text": TextConfig(tokenizer=str(spm), width=32, depth=1, heads=2, max_len=12)})
    return build_model(cfg, seed=0)


def _batch(spm: Path, n: int = 6) -> Batch:
    rng = random.Random(0)
    tok = load_tokenizer(spm, 12)
    enc = [tok.encode(" ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(2, 12)))) for _ in range(n)]
    text = {k: torch.stack([e[k] for e in enc]) for k in enc[0]}
    ones = torch.ones(n, dtype=torch.bool)
    return Batch(inputs={"audio": torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(0)),
                         "text": text}, present={"audio": ones, "text": ones.clone()},
                 keys=[f"k{i}" for i in range(n)], index=5)


def test_attention_pattern_follows_the_definition() -> None:
    ctx_mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    text_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    prefix = torch.tensor([0, 2])
    allowed = prefix_lm_attention(ctx_mask, text_mask, prefix)
    for b in range(2):
        for i in range(8):
            for j in range(8):
                real = bool(ctx_mask[b, j]) if j < 3 else bool(text_mask[b, j - 3])
                key_prefix = j < 3 or j - 3 < int(prefix[b])
                causal = i >= 3 and j >= 3 and j <= i
                assert bool(allowed[b, i, j]) == (i == j or (real and (key_prefix or causal))), (b, i, j)


def _decoder(width: int = 16, vocab: int = 13, tie: bool = False) -> PrefixLMDecoder:
    torch.manual_seed(0)
    return PrefixLMDecoder(8, vocab, block=Block, width=width, depth=2, heads=2, max_len=16,
                           tie_embeddings=tie).eval()


@pytest.mark.parametrize("prefix_len", [0, 3])
def test_future_tokens_do_not_reach_earlier_positions(prefix_len: int) -> None:
    dec = _decoder()
    g = torch.Generator().manual_seed(1)
    ctx, ctx_mask = torch.randn(2, 4, 8, generator=g), torch.ones(2, 4, dtype=torch.bool)
    ids, text_mask = torch.randint(4, 13, (2, 9), generator=g), torch.ones(2, 9, dtype=torch.bool)
    text_mask[1, 7:] = False
    with torch.no_grad():
        base = dec(ctx, ctx_mask, ids, text_mask, prefix_len)
        for k in range(prefix_len, 9):  # a non-prefix text token changes only positions >= k
            changed = ids.clone()
            changed[:, k] = (changed[:, k] - 4 + 1) % 9 + 4
            out = dec(ctx, ctx_mask, changed, text_mask, prefix_len)
            torch.testing.assert_close(out[0, :k], base[0, :k], rtol=0, atol=1e-6)
            assert float((out[0, k:] - base[0, k:]).abs().amax(-1).min()) > 1e-4
        for k in range(prefix_len):  # a prefix text token changes every position
            changed = ids.clone()
            changed[:, k] = (changed[:, k] - 4 + 1) % 9 + 4
            diff = (dec(ctx, ctx_mask, changed, text_mask, prefix_len) - base)[0].abs().amax(-1)
            assert float(diff.min()) > 1e-4
        moved = ctx.clone()
        moved[:, 2] += 1.0  # a context token changes every position
        assert float((dec(moved, ctx_mask, ids, text_mask, prefix_len) - base)[0].abs().amax(-1).min()) > 1e-4
        padded = ids.clone()
        padded[1, 7:] = 0  # padding never reaches a real token
        torch.testing.assert_close(dec(ctx, ctx_mask, padded, text_mask, prefix_len)[1, :7], base[1, :7], rtol=0,
                                   atol=1e-6)


def _nll64(logits: torch.Tensor, ids: torch.Tensor, text_mask: torch.Tensor, prefix: list[int],
           rows: list[int]) -> torch.Tensor:
    terms = []
    for b in rows:
        for t in range(max(prefix[b], 1), ids.shape[1]):
            if text_mask[b, t]:
                z = logits[b, t - 1].double()
                terms.append(math.log(float(torch.exp(z).sum())) - float(z[ids[b, t]]))
    return torch.tensor(sum(terms) / len(terms), dtype=torch.float64)


def test_loss_equals_float64_recomputation_and_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 7, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 7, (3, 6), generator=g)
    text_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4], dtype=torch.bool)
    prefix = torch.tensor([0, 2, 1])
    valid = torch.tensor([True, True, False])
    loss, _ = prefix_lm_loss(logits, ids, text_mask, prefix, valid=valid)
    torch.testing.assert_close(loss, _nll64(logits, ids, text_mask, prefix.tolist(), [0, 1]), **TOL)
    assert torch.autograd.gradcheck(lambda z: prefix_lm_loss(z, ids, text_mask, prefix, valid=valid)[0],
                                    logits.clone().requires_grad_())
    dec = _decoder(width=8, tie=True).double()  # through the whole decoder: attention masks keep gradients finite
    ctx = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda c: prefix_lm_loss(dec(c, torch.ones(2, 3, dtype=torch.bool), ids[:2], text_mask[:2], 1), ids[:2],
                                 text_mask[:2], 1)[0], ctx)


@pytest.mark.parametrize("tie,random_prefix", [(False, False), (True, True)])
def test_objective_loss_equals_recomputation(model, spm: Path, tie: bool, random_prefix: bool) -> None:
    obj = PrefixLMObjective.from_config(PrefixLMConfig(width=32, heads=2, prefix_text_len=3, tie_embeddings=tie,
                                                       random_prefix=random_prefix), model.spec)
    obj.check(model.spec, "objectives.prefix_lm")
    assert obj.requires.needs_decoder and (obj.decoder.head is None) == tie
    batch = _batch(spm)
    batch.present["audio"][2] = False
    out = model(batch.inputs, batch.present)
    loss = obj(out, batch, model).loss
    prefix = obj.prefix_lengths(batch, 6)
    assert torch.equal(prefix, obj.prefix_lengths(batch, 6))  # drawn per sample key and batch index
    if random_prefix:
        assert len(set(prefix.tolist())) > 1 and int(prefix.max()) <= 3
    else:
        assert prefix.tolist() == [3] * 6
    ids, am = batch.inputs["text"]["input_ids"], batch.inputs["text"]["attention_mask"].bool()
    with torch.no_grad():
        logits = obj.decoder(out.tokens["audio"], out.token_mask["audio"], ids, am, prefix)
    ref = _nll64(logits, ids, am, prefix.tolist(), [0, 1, 3, 4, 5])
    torch.testing.assert_close(loss.double(), ref, **TOL)


def test_configuration_errors(model) -> None:
    with pytest.raises(ObjectiveError, match="target='audio' is not a token-id modality"):
        PrefixLMObjective.from_config(PrefixLMConfig(context="text", target="audio"), model.spec)
    with pytest.raises(ObjectiveError, match="context='image'"):
        PrefixLMObjective.from_config(PrefixLMConfig(context="image"), model.spec)
    with pytest.raises(ObjectiveError, match="width=30 must be divisible by heads=4"):
        PrefixLMObjective.from_config(PrefixLMConfig(width=30), model.spec)


def test_loss_decreases_on_a_fixed_batch(spm: Path) -> None:
    cfg = ModelConfig(embed_dim=16, towers={
        "audio": AudioConfig(width=32, depth=1, heads=2, frames=32, n_mels=32, patch_size=[8, 8]),
        "text": TextConfig(tokenizer=str(spm), width=32, depth=1, heads=2, max_len=12)})
    model = build_model(cfg, seed=0)
    obj = PrefixLMObjective.from_config(PrefixLMConfig(width=32, heads=2), model.spec)
    batch = _batch(spm, n=8)
    opt = torch.optim.Adam([*model.parameters(), *obj.parameters()], lr=2e-3)
    losses = []
    for _ in range(30):
        loss = obj(model({"audio": batch.inputs["audio"]}, batch.present), batch, model).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses

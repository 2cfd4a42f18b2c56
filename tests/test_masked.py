"""Mask generators, MLM / cross-modal MLM / MAE / masked cluster prediction against float64 re-implementations.

Tolerances: float32 objective losses against float64 loops within ``rtol=1e-5, atol=1e-5``; statistical checks
within 4 standard deviations.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import timm
import torch

from mmssl.architectures.config import FusionConfig, ModelConfig, build_model
from mmssl.architectures.layers.blocks import Block
from mmssl.architectures.modalities import AudioConfig, TextConfig
from mmssl.architectures.modalities.masking import (
    block_mask,
    patchify,
    random_token_mask,
    span_mask,
    time_span_mask,
    unpatchify,
)
from mmssl.architectures.modalities.tokenizers import load_tokenizer
from mmssl.architectures.outputs import ModelSpec
from mmssl.data_pipelines.batch import Batch
from mmssl.objectives.base import ObjectiveError
from mmssl.objectives.kmeans import kmeans
from mmssl.objectives.masked import (
    CrossMLMConfig,
    CrossModalMLMObjective,
    MAEConfig,
    MAEDecoder,
    MAEObjective,
    MaskedClusterConfig,
    MaskedClusterObjective,
    MLMConfig,
    MLMObjective,
    cluster_targets,
    mae_loss,
    mlm_loss,
    norm_pix_target,
    token_ce,
)
from mmssl.objectives.masking import KEPT, MASKED, RANDOM, bert_mask, row_generators
from tests.conftest import PROMPT_WORDS
from tests.helpers.spawn import spawn_ranks

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _cfg(spm: Path, family: str = "late_fusion") -> ModelConfig:
    return ModelConfig(family=family, embed_dim=16, fusion=FusionConfig(width=24, depth=1, heads=2), towers={
        "audio": AudioConfig(width=32, depth=1, heads=2, frames=32, n_mels=32, patch_size=[8, 8]),
        "text": TextConfig(tokenizer=str(spm), width=32, depth=1, heads=2, max_len=12)})


def _batch(spm: Path, n: int = 6, seed: int = 0) -> Batch:
    rng = random.Random(seed)
    tok = load_tokenizer(spm, 12)
    enc = [tok.encode(" ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(2, 12)))) for _ in range(n)]
    text = {k: torch.stack([e[k] for e in enc]) for k in enc[0]}
    audio = torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5
    ones = torch.ones(n, dtype=torch.bool)
    return Batch(inputs={"audio": audio, "text": text}, present={"audio": ones, "text": ones.clone()},
                 keys=[f"s{seed}-{i}" for i in range(n)], index=3)


@pytest.fixture(scope="module")
def model(spm: Path):
    return build_model(_cfg(spm), seed=0).eval()


# ---------------------------------------------------------------- (a) mask generators
def _bert(ids: torch.Tensor, am: torch.Tensor, *, special_ids: list[int], mask_id: int, vocab_size: int,
          generator, ratio: float = 0.15):
    """MLM's masking: the text plug-in's selection (`random_token_mask` over real, non-special tokens, at least one)
    then `bert_mask`'s 80/10/10 replacement, from the same generators."""
    specials = torch.tensor(sorted({*special_ids, mask_id}))
    maskable = am.bool() & ~torch.isin(ids, specials)
    selected = random_token_mask(ids.shape[0], ids.shape[1], ratio, generator, maskable=maskable, min_count=1)
    return bert_mask(ids, selected, special_ids=special_ids, mask_id=mask_id, vocab_size=vocab_size,
                     generator=generator)


def test_bert_mask_counts_specials_and_determinism() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (64, 20), generator=g)
    am = torch.ones_like(ids)
    lengths = torch.randint(0, 21, (64,), generator=g)
    am[torch.arange(20)[None] >= lengths[:, None]] = 0
    ids[am == 0] = 0
    ids[:, 0] = 2  # bos
    ids[torch.arange(64), (lengths - 1).clamp_min(0)] = 3  # eos
    kw = {"special_ids": [0, 2, 3], "mask_id": 4, "vocab_size": 50, "ratio": 0.15}
    out = _bert(ids, am, generator=torch.Generator().manual_seed(1), **kw)
    for row in range(64):
        maskable = [t for t in range(20) if am[row, t] and int(ids[row, t]) not in (0, 2, 3)]
        sel = out.selected[row].nonzero().squeeze(1).tolist()
        assert set(sel) <= set(maskable)  # never a special or padding
        assert len(sel) == (max(1, math.floor(0.15 * len(maskable) + 0.5)) if maskable else 0)
    again = _bert(ids, am, generator=torch.Generator().manual_seed(1), **kw)
    other = _bert(ids, am, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(again.input_ids, out.input_ids) and torch.equal(again.selected, out.selected)
    assert not torch.equal(other.selected, out.selected)
    # per-row generators: a row's mask depends on its key, not its position
    keys = [f"k{i}" for i in range(64)]
    a = _bert(ids, am, generator=row_generators(7, keys, 0), **kw)
    perm = torch.randperm(64, generator=g)
    b = _bert(ids[perm], am[perm], generator=row_generators(7, [keys[i] for i in perm], 0), **kw)
    assert torch.equal(a.selected[perm], b.selected) and torch.equal(a.input_ids[perm], b.input_ids)


def test_bert_mask_80_10_10() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (2000, 40), generator=g)
    out = _bert(ids, torch.ones_like(ids), special_ids=[0, 1, 2, 3], mask_id=4, vocab_size=40, generator=g)
    sel = out.selected
    n = int(sel.sum())
    assert n == 2000 * 6  # round(0.15 * 40) per row
    act = out.action[sel]
    for code, p in ((MASKED, 0.8), (RANDOM, 0.1), (KEPT, 0.1)):
        frac = float((act == code).float().mean())
        assert abs(frac - p) <= 4 * math.sqrt(p * (1 - p) / n), (code, frac)
    new, old = out.input_ids[sel], ids[sel]
    assert bool((new[act == MASKED] == 4).all()) and bool((new[act == KEPT] == old[act == KEPT]).all())
    rnd = new[act == RANDOM]
    assert int(rnd.min()) >= 5 and int(rnd.max()) < 40  # random ids are never special
    assert torch.equal(out.input_ids[~sel], ids[~sel])


def test_patch_span_and_block_masks() -> None:
    m = random_token_mask(50, 48, 0.75, torch.Generator().manual_seed(0))
    assert bool((m.sum(1) == math.floor(0.75 * 48 + 0.5)).all())  # the one count: ratio·n rounded, halves up
    assert torch.equal(m, random_token_mask(50, 48, 0.75, torch.Generator().manual_seed(0)))
    # spans: s = round(p·T) distinct starts in [0, T-L], L steps each; expected union from the hypergeometric law
    T, L, p, rows = 50, 5, 0.1, 3000
    s, positions = 5, T - L + 1
    sm = span_mask(rows, T, start_prob=p, span=L, generator=torch.Generator().manual_seed(0))
    for row in sm[:200].tolist():
        runs, cur = [], 0
        for v in [*row, False]:
            if v:
                cur += 1
            elif cur:
                runs.append(cur)
                cur = 0
        assert all(r >= L for r in runs) and L <= sum(runs) <= s * L
    expected = 0.0
    for t in range(T):
        window = min(t, positions - 1) - max(0, t - L + 1) + 1  # starts that cover t
        expected += 1 - math.comb(positions - window, s) / math.comb(positions, s)
    counts = sm.sum(1).double()
    assert abs(float(counts.mean()) - expected) <= 4 * float(counts.std()) / math.sqrt(rows)
    tm = time_span_mask(4, (3, 10), start_prob=0.2, span=2, generator=torch.Generator().manual_seed(0))
    grid = tm.view(4, 3, 10)
    assert torch.equal(grid, grid[:, :1].expand(4, 3, 10)) and bool((grid[:, 0].sum(1) >= 2).all())
    bm = block_mask(20, (6, 8), 0.4, torch.Generator().manual_seed(0))
    assert bool((bm.sum(1) >= round(0.4 * 48)).all()) and bool((bm.sum(1) < 48).all())


# ---------------------------------------------------------------- (b) MLM
def _head64(head: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """BERT head in float64 from the formula: LN(GELU(W_d h + b_d)) then W_o."""
    d = lambda t: t.detach().double()  # noqa: E731
    z = h.double() @ d(head.dense.weight).T + d(head.dense.bias)
    z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    z = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + head.norm.eps)
    z = z * d(head.norm.weight) + d(head.norm.bias)
    return z @ d(head.out.weight).T + d(head.out.bias)


def _ce64(logits: torch.Tensor, targets: list[int]) -> torch.Tensor:
    total = sum(-(logits[i, t] - torch.log(torch.exp(logits[i]).sum())) for i, t in enumerate(targets))
    return total / len(targets)


def test_mlm_loss_counts_only_masked_positions() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (3, 7), generator=g)
    sel = torch.rand(3, 7, generator=g) < 0.3
    loss = mlm_loss(logits, targets, sel)
    pos = sel.nonzero().tolist()
    ref = _ce64(torch.stack([logits[b, t].double() for b, t in pos]), [int(targets[b, t]) for b, t in pos])
    torch.testing.assert_close(loss.double(), ref, **TOL)
    loss.backward()
    assert float(logits.grad[~sel].abs().max()) == 0.0
    changed = logits.detach().clone()
    changed[~sel] += torch.randn_like(changed[~sel]) * 5
    assert float(mlm_loss(changed, targets, sel)) == float(loss.detach())


@pytest.mark.parametrize("cross", [False, True])
def test_mlm_objective_equals_float64_recomputation(model, spm: Path, cross: bool) -> None:
    spec = model.spec
    obj = (CrossModalMLMObjective.from_config(CrossMLMConfig(mask_ratio=0.3), spec) if cross
           else MLMObjective.from_config(MLMConfig(mask_ratio=0.3), spec))
    obj.check(spec, "objectives.x")
    batch = _batch(spm)
    batch.present["text"][1] = False
    if cross:
        batch.present["audio"][4] = False
    out = model(batch.inputs, batch.present)
    loss = obj(out, batch, model).loss
    tm = obj.make_mask(batch, model)
    ids, am = batch.inputs["text"]["input_ids"], batch.inputs["text"]["attention_mask"]
    assert not torch.equal(tm.input_ids, ids)
    with torch.no_grad():
        states = model.towers["text"]({"input_ids": tm.input_ids, "attention_mask": am}).features
        if cross:
            states = model.fusion({"text": states, "audio": out.tokens["audio"]},
                                  {"text": am.bool(), "audio": out.token_mask["audio"]}, "text")
    keep = [(b, t) for b in range(6) for t in range(12) if tm.selected[b, t] and b != 1 and not (cross and b == 4)]
    logits = torch.stack([_head64(obj.head, states[b, t]) for b, t in keep])
    ref = _ce64(logits, [int(ids[b, t]) for b, t in keep])
    torch.testing.assert_close(loss.double(), ref, **TOL)


def test_configuration_errors(model, spm: Path) -> None:
    free = build_model(_cfg(spm, "fusion_free"), seed=0).spec
    with pytest.raises(ObjectiveError, match="fusion module"):
        CrossModalMLMObjective.from_config(CrossMLMConfig(), free)
    with pytest.raises(ObjectiveError, match="mask_ratio"):
        MLMObjective.from_config(MLMConfig(mask_ratio=1.5), free)
    nomask = ModelSpec(**{**free.__dict__, "special_tokens": {"text": {"pad": 0}}})
    with pytest.raises(ObjectiveError, match="no mask token"):
        MLMObjective.from_config(MLMConfig(), nomask)
    with pytest.raises(ObjectiveError, match="modality='text' has no tower that encodes a masked view"):
        MAEObjective.from_config(MAEConfig(modality="text"), free)
    with pytest.raises(ObjectiveError, match="grid"):
        MAEObjective.from_config(MAEConfig(pos_embed="learned"), free)


# ---------------------------------------------------------------- (c) MAE
def test_patchify_matches_timm_patch_embed_and_inverts() -> None:
    c, ph, pw = 3, 2, 3
    vit = timm.create_model("vit_tiny_patch16_224", img_size=(4, 9), patch_size=(ph, pw), in_chans=c,
                            embed_dim=c * ph * pw, depth=1, num_heads=2, num_classes=0)
    proj = vit.patch_embed.proj
    with torch.no_grad():  # output channel (i·pw + j)·C + ch reads pixel (ch, i, j) of its patch
        proj.weight.zero_()
        proj.bias.zero_()
        for i in range(ph):
            for j in range(pw):
                for ch in range(c):
                    proj.weight[(i * pw + j) * c + ch, ch, i, j] = 1.0
    x = torch.randn(2, c, 4, 9)
    torch.testing.assert_close(vit.patch_embed(x), patchify(x, (ph, pw)), rtol=0, atol=1e-6)
    assert torch.equal(unpatchify(patchify(x, (ph, pw)), (ph, pw), (2, 3), c), x)
    p = torch.randn(2, 6, c * ph * pw)
    assert torch.equal(patchify(unpatchify(p, (ph, pw), (2, 3), c), (ph, pw)), p)


def test_norm_pix_target_and_mae_loss_formula() -> None:
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(2, 5, 6, generator=g) * 3 + 1
    pred = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)
    target = norm_pix_target(patches)
    total, count = 0.0, 0
    for b in range(2):
        for n in range(5):
            p = [float(v) for v in patches[b, n].double()]
            mean = sum(p) / 6
            var = sum((v - mean) ** 2 for v in p) / 5  # unbiased, as MAE's torch .var
            t = [(v - mean) / math.sqrt(var + 1e-6) for v in p]
            assert max(abs(t[d] - float(target[b, n, d])) for d in range(6)) <= 1e-5
            if mask[b, n]:
                total += sum((float(pred.detach()[b, n, d]) - t[d]) ** 2 for d in range(6)) / 6
                count += 1
    loss = mae_loss(pred, patches, mask)
    assert abs(float(loss.detach()) - total / count) <= 1e-5
    loss.backward()
    assert float(pred.grad[~mask].abs().max()) == 0.0
    assert torch.autograd.gradcheck(lambda q: mae_loss(q, patches.double(), mask), pred.detach().double()
                                    .requires_grad_())


def test_mae_decoder_puts_tokens_at_their_grid_positions() -> None:
    torch.manual_seed(0)
    dec = MAEDecoder(6, 4, block=Block, width=8, depth=1, heads=2, mlp_ratio=2.0, grid=None)
    mask = random_token_mask(3, 12, 0.5, torch.Generator().manual_seed(0))
    features = torch.randn(3, 1 + 6, 6)  # one prefix token + 6 visible
    seen = []
    dec.blocks[0].register_forward_pre_hook(lambda _, a: seen.append(a[0].detach()))
    assert dec(features, mask, (3, 4), 6).shape == (3, 12, 4)
    x = seen[0].double()
    emb = features.double() @ dec.embed.weight.detach().double().T + dec.embed.bias.detach().double()
    for b in range(3):
        torch.testing.assert_close(x[b, 0], emb[b, 0], **TOL)  # prefix token, no position
        j = 0
        for n in range(12):
            r, c = divmod(n, 4)
            pos = [f(v * 10000 ** (-k / 2)) for v in (r, c) for f in (math.sin, math.cos) for k in range(2)]
            token = dec.mask_token.detach().double() if mask[b, n] else emb[b, 1 + j]
            j += int(not mask[b, n])
            torch.testing.assert_close(x[b, 1 + n], token + torch.tensor(pos, dtype=torch.float64), **TOL)


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_mae_objective_encodes_visible_patches_only(model, spm: Path, pos_embed: str) -> None:
    spec = model.spec
    obj = MAEObjective.from_config(MAEConfig(decoder_width=32, decoder_heads=2, pos_embed=pos_embed, grid=[4, 4]),
                                   spec)
    batch = _batch(spm)
    batch.present["audio"][2] = False
    seen = []
    handle = model.towers["audio"].model.blocks.register_forward_pre_hook(lambda _, a: seen.append(a[0].shape))
    out = model(batch.inputs, batch.present)
    loss = obj(out, batch, model).loss
    handle.remove()
    assert seen[-1] == (6, 1 + 4, 32)  # class token + 16 - 12 visible patches
    mask = obj.make_mask(batch, model)
    assert bool((mask.sum(1) == 12).all())
    with torch.no_grad():
        pred = obj.decoder(model.towers["audio"](batch.inputs["audio"], mask=mask).features, mask, (4, 4), 4)
    target = norm_pix_target(patchify(batch.inputs["audio"].double(), (8, 8)))
    errs = [((pred[b, n].double() - target[b, n]) ** 2).mean() for b in range(6) for n in range(16)
            if mask[b, n] and b != 2]
    torch.testing.assert_close(loss.double(), torch.stack(errs).mean(), **TOL)


# ---------------------------------------------------------------- (e) masked cluster prediction
def test_cluster_targets_are_the_float64_argmin() -> None:
    g = torch.Generator().manual_seed(0)
    patches, codebook = torch.randn(3, 10, 8, generator=g), torch.randn(5, 8, generator=g)
    z = cluster_targets(patches, codebook)
    for b in range(3):
        for n in range(10):
            d = [sum((float(patches[b, n, i]) - float(codebook[k, i])) ** 2 for i in range(8)) for k in range(5)]
            assert int(z[b, n]) == min(range(5), key=d.__getitem__)


def test_masked_cluster_objective(model, spm: Path) -> None:
    spec = model.spec
    cfg = MaskedClusterConfig(num_clusters=8, mask="span", span_start_prob=0.25, span_length=2)
    obj = MaskedClusterObjective.from_config(cfg, spec)
    batch = _batch(spm)
    batch.present["audio"][0] = False
    out = model(batch.inputs, batch.present)
    loss = obj(out, batch, model).loss
    patches = patchify(batch.inputs["audio"], (8, 8))
    assert int(obj.codebook_fits[0]) == 1
    torch.testing.assert_close(obj.codebook, kmeans(patches[1:].flatten(0, 1), 8, 20, 0)[0])
    mask = obj.make_mask(batch, model)
    with torch.no_grad():
        states = model.towers["audio"](batch.inputs["audio"], mask=mask, mask_token=obj.mask_token).features[:, 1:]
    keep = [(b, n) for b in range(1, 6) for n in range(16) if mask[b, n]]
    targets = cluster_targets(patches, obj.codebook)
    logits = torch.stack([states[b, n].double() @ obj.head.weight.detach().double().T
                          + obj.head.bias.detach().double() for b, n in keep])
    torch.testing.assert_close(loss.double(), _ce64(logits, [int(targets[b, n]) for b, n in keep]), **TOL)
    before = obj.codebook.clone()
    obj(out, _batch(spm, seed=1), model)
    assert torch.equal(obj.codebook, before)  # fitted once ...
    obj.refresh(10, lambda: iter(()))
    obj(out, _batch(spm, seed=1), model)
    assert int(obj.codebook_fits[0]) == 2 and not torch.equal(obj.codebook, before)  # ... and after a refresh
    again = MaskedClusterObjective.from_config(cfg, spec)
    again.load_state_dict(obj.state_dict())
    assert torch.equal(again.codebook, obj.codebook) and int(again.codebook_fits[0]) == 2


# ---------------------------------------------------------------- (f) training sanity
@pytest.mark.parametrize("kind", ["mlm", "masked_cross", "mae", "masked_cluster"])
def test_losses_decrease_on_a_fixed_batch(spm: Path, kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(spm), seed=0)
    spec = model.spec
    obj = {"mlm": lambda: MLMObjective.from_config(MLMConfig(mask_ratio=0.3), spec),
           "masked_cross": lambda: CrossModalMLMObjective.from_config(CrossMLMConfig(mask_ratio=0.3), spec),
           "mae": lambda: MAEObjective.from_config(MAEConfig(decoder_width=32, decoder_heads=2), spec),
           "masked_cluster": lambda: MaskedClusterObjective.from_config(MaskedClusterConfig(num_clusters=8), spec),
           }[kind]()
    batch = _batch(spm, n=8)
    needed = {m: batch.inputs[m] for m in obj.requires.modalities}  # the main forward of what the loss reads
    opt = torch.optim.Adam([*model.parameters(), *obj.parameters()], lr=2e-3)
    losses = []
    for _ in range(30):
        loss = obj(model(needed, batch.present), batch, model).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.85 * losses[0], losses


# ---------------------------------------------------------------- distributed: global token mean, codebook
def _ranks(rank: int, world: int) -> dict:
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(14, 9, generator=g), torch.randint(0, 9, (14,), generator=g)
    rows = slice(0, 5) if rank == 0 else slice(5, 14)  # unequal token counts per rank
    mine = logits[rows].clone().requires_grad_()
    loss, _ = token_ce(mine, targets[rows])
    loss.backward()
    spec = ModelSpec(family="fusion_free", modalities=("audio",), embed_dim=8, feature_dims={"audio": 8},
                     token_dims={"audio": 8}, mask_kinds={"audio": ("random", "span", "block")},
                     mask_grids={"audio": (2, 2)}, mask_targets={"audio": 4})
    obj = MaskedClusterObjective(MaskedClusterConfig(num_clusters=3), spec)
    obj.fit_codebook(torch.randn(20, 4, generator=torch.Generator().manual_seed(rank))[: 20 if rank == 0 else 13])
    return {"loss": loss.detach(), "grad": mine.grad, "codebook": obj.codebook}


def test_global_token_mean_and_codebook_broadcast_over_two_ranks() -> None:
    res = spawn_ranks(_ranks)
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(14, 9, generator=g), torch.randint(0, 9, (14,), generator=g)
    logits.requires_grad_()
    ref, _ = token_ce(logits, targets)
    ref.backward()
    torch.testing.assert_close((res[0]["loss"] + res[1]["loss"]) / 2, ref.detach())
    # each rank's gradient is world x its share; DeepSpeed's averaging divides by world
    torch.testing.assert_close(torch.cat([res[0]["grad"], res[1]["grad"]]) / 2, logits.grad)
    both = [torch.randn(20, 4, generator=torch.Generator().manual_seed(r)) for r in (0, 1)]
    expected = kmeans(torch.cat([both[0], both[1][:13]]), 3, 20, 0)[0]  # rank order, unequal row counts
    for r in res:
        torch.testing.assert_close(r["codebook"], expected)


def test_tied_mlm_decoder_shares_the_embedding_table_and_sums_both_gradients(spm: Path) -> None:
    """``tie_embeddings`` (BERT / ALBEF): the decoder weight *is* the text tower's input embedding table, counted once
    in the task's parameters, and its gradient is the sum of the gradients an untied copy gives to the embedding
    table and to the decoder, on the same batch and masks."""
    from mmssl.pretrain.task import PretrainTask

    cfg = ModelConfig(family="late_fusion", embed_dim=16, fusion=FusionConfig(width=32, depth=1, heads=2), towers={
        "audio": AudioConfig(width=32, depth=1, heads=2, frames=32, n_mels=32, patch_size=[8, 8]),
        "text": TextConfig(tokenizer=str(spm), width=32, depth=1, heads=2, max_len=12)})
    batch = _batch(spm)
    grads = {}
    for tie in (True, False):
        model = build_model(cfg, seed=0).eval()
        spec = model.spec
        torch.manual_seed(1)
        objective = CrossModalMLMObjective.from_config(CrossMLMConfig(context="audio", tie_embeddings=tie,
                                                                      global_norm=False), spec)
        table = model.input_embeddings("text")
        if not tie:  # the untied run starts from the same values: decoder = a copy of the table
            objective.head.out.weight.data.copy_(table.weight.data)
        task = PretrainTask(model, {"masked_cross": objective}, {"masked_cross": 1.0})
        if tie:
            assert objective.head.out.weight is table.weight
            assert objective.max_zero_stage == 2
            names = [n for n, p in task.named_parameters() if p is table.weight]
            assert len(names) == 1  # one tensor, one optimizer entry
        task(batch).loss.backward()
        grads[tie] = (table.weight.grad.clone(), objective.head.out.weight.grad.clone())
    tied, _ = grads[True]
    emb, dec = grads[False]
    assert torch.allclose(tied, emb + dec, atol=1e-6)
    assert dec.abs().sum() > 0 and emb.abs().sum() > 0


def test_tied_decoder_needs_matching_widths(spm: Path) -> None:
    model = build_model(_cfg(spm), seed=0)  # fusion width 24, text width 32
    objective = CrossModalMLMObjective.from_config(CrossMLMConfig(context="audio", tie_embeddings=True), model.spec)
    with pytest.raises(ObjectiveError, match="tie_embeddings: the embedding table"):
        objective.bind(model)

"""The matching (ITM) objective: value and gradients against a float64 loop, the hard-negative sampler's
distribution, equivalence of 2 gloo ranks with 1 process on the concatenated batch, and the model checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from mmssl.architectures.fusion import CrossAttentionFusion
from mmssl.architectures.outputs import ModelOutput, ModelSpec
from mmssl.data_pipelines.batch import Batch
from mmssl.objectives.base import ObjectiveError
from mmssl.objectives.ids import meta_ids
from mmssl.objectives.matching import (
    MatchingConfig,
    MatchingObjective,
    negative_candidates,
    negative_probs,
    negative_uniforms,
    sample_negatives,
)
from tests.helpers.spawn import spawn_ranks

DT, DA, FW, E = 12, 10, 16, 8  # text / audio token widths, fusion width, embedding width
TRANSCRIPTS = ["call me", "hello", "goodbye", "hello", "press one", "call me"]


class FakeModel(nn.Module):
    """Only what matching calls: a real cross-attention fusion behind ``fuse``."""

    def __init__(self) -> None:
        super().__init__()
        self.fusion = CrossAttentionFusion({"text": DT, "audio": DA}, width=FW, depth=1, heads=2)

    def fuse(self, tokens, token_mask, query: str) -> Tensor:
        return self.fusion(tokens, token_mask, query)


def _spec(fusion_dim: int | None = FW, family: str = "late_fusion") -> ModelSpec:
    return ModelSpec(family=family, modalities=("audio", "text"), embed_dim=E, feature_dims={"audio": DA, "text": DT},
                     token_dims={"audio": DA, "text": DT}, fusion_dim=fusion_dim)


def _data(n: int, seed: int = 0, text_len: int = 5) -> dict:
    """Fixed random tokens with padding, two absent rows, transcripts with duplicates."""
    g = torch.Generator().manual_seed(seed)
    t_len = torch.randint(1, text_len + 1, (n,), generator=g)
    a_len = torch.randint(3, 7, (n,), generator=g)
    present_t, present_a = torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
    present_t[2], present_a[n - 3] = False, False
    return {
        "tokens": {"text": torch.randn(n, text_len, DT, generator=g), "audio": torch.randn(n, 6, DA, generator=g)},
        "mask": {"text": torch.arange(text_len)[None] < t_len[:, None],
                 "audio": torch.arange(6)[None] < a_len[:, None]},
        "emb": {"text": torch.randn(n, E, generator=g), "audio": torch.randn(n, E, generator=g)},
        "present": {"text": present_t, "audio": present_a},
        "meta": [TRANSCRIPTS[i % len(TRANSCRIPTS)] for i in range(n)],
    }


def _outputs(model: FakeModel, d: dict, tokens: dict, rows: slice, reuse: bool = True) -> ModelOutput:
    toks = {m: t[rows] for m, t in tokens.items()}
    mask = {m: k[rows] for m, k in d["mask"].items()}
    fused = {"text": model.fuse(toks, mask, "text")} if reuse else {}
    return ModelOutput(embeddings={m: e[rows] for m, e in d["emb"].items()}, pooled={}, tokens=toks,
                       present={m: p[rows] for m, p in d["present"].items()}, token_mask=mask, fused=fused)


def _batch(d: dict, rows: slice, index: int) -> Batch:
    meta = d["meta"][rows]
    return Batch(inputs={}, present={}, keys=[f"k{i}" for i in range(len(meta))], meta={"text": meta}, index=index)


def _reference(model: FakeModel, head: nn.Linear, d: dict, tokens: dict, neg_c: Tensor, neg_q: Tensor) -> Tensor:
    """Float64 loop over items: fuse each (query, context) pair alone, head, -log softmax, mean over items."""
    valid = d["present"]["text"] & d["present"]["audio"]
    items = []
    for i in range(valid.shape[0]):
        if not valid[i]:
            continue
        items.append((i, i, 1))
        if neg_c[i] >= 0:
            items.append((i, int(neg_c[i]), 0))
        if neg_q[i] >= 0:
            items.append((int(neg_q[i]), i, 0))
    total = torch.zeros((), dtype=torch.float64)
    for qi, ci, label in items:
        fused = model.fuse({"text": tokens["text"][qi : qi + 1], "audio": tokens["audio"][ci : ci + 1]},
                           {"text": d["mask"]["text"][qi : qi + 1], "audio": d["mask"]["audio"][ci : ci + 1]}, "text")
        logits = head(fused[0, 0])
        total = total - (logits[label] - torch.log(torch.exp(logits[0]) + torch.exp(logits[1])))
    return total / len(items)


@pytest.mark.parametrize("negatives", ["hard", "random"])
@pytest.mark.parametrize("reuse", [True, False])
def test_value_and_gradients_match_a_float64_loop(negatives: str, reuse: bool) -> None:
    torch.manual_seed(0)
    model, n = FakeModel(), 10
    obj = MatchingObjective(FW, negatives=negatives, temperature=0.2, exclude_duplicates="text", seed=5)
    d = _data(n)
    tokens = {m: t.clone().requires_grad_(True) for m, t in d["tokens"].items()}
    out = obj(_outputs(model, d, tokens, slice(None), reuse=reuse), _batch(d, slice(None), index=7), model)
    out.loss.backward()
    negs = obj.last_negatives
    assert negs is not None

    valid = d["present"]["text"] & d["present"]["audio"]
    for i in range(n):  # legal negatives: another valid row with a different transcript; none for absent rows
        for j in (int(negs.context[i]), int(negs.query[i])):
            if not valid[i]:
                assert j == -1
            else:
                assert j != i and valid[j] and d["meta"][j] != d["meta"][i]

    model64, head64 = copy.deepcopy(model).double(), copy.deepcopy(obj.head).double()
    tokens64 = {m: t.detach().double().requires_grad_(True) for m, t in d["tokens"].items()}
    ref = _reference(model64, head64, d, tokens64, negs.context, negs.query)
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for m in tokens:
        torch.testing.assert_close(tokens[m].grad.double(), tokens64[m].grad, rtol=1e-4, atol=1e-6)
    for p, p64 in zip(obj.head.parameters(), head64.parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-6)
    for p, p64 in zip(model.parameters(), model64.parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-6)
    assert 0.0 <= float(out.metrics["acc"]) <= 1.0


def test_sampling_is_seeded_by_seed_and_batch_index() -> None:
    torch.manual_seed(0)
    model, d = FakeModel(), _data(10)

    def draw(seed: int, index: int) -> Tensor:
        obj = MatchingObjective(FW, seed=seed)
        with torch.no_grad():
            obj(_outputs(model, d, d["tokens"], slice(None)), _batch(d, slice(None), index), model)
        return torch.cat([obj.last_negatives.context, obj.last_negatives.query])

    assert torch.equal(draw(0, 3), draw(0, 3))
    assert not torch.equal(draw(0, 3), draw(0, 4))
    assert not torch.equal(draw(0, 3), draw(1, 3))


def test_hard_negative_distribution_is_the_softmax_without_the_positive() -> None:
    from scipy.stats import chi2  # here, not at the top: spawned ranks import this module

    g = torch.Generator().manual_seed(0)
    n, scale, draws = 6, 3.0, 4000
    q = torch.nn.functional.normalize(torch.randn(n, E, generator=g, dtype=torch.float64), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(n, E, generator=g, dtype=torch.float64), dim=-1)
    sim = q @ c.T
    valid = torch.tensor([True, True, True, True, False, True])  # row 4 absent: never a candidate
    groups = meta_ids(["a", "b", "c", "a", "d", None])  # rows 0 and 3 are duplicates
    rows = torch.arange(n)
    allowed = negative_candidates(valid, valid, rows, groups, groups)
    probs = negative_probs(sim, allowed, scale)
    for i in range(n):  # the distribution, by hand
        cand = [j for j in range(n) if valid[i] and valid[j] and j != i and not (i in (0, 3) and j in (0, 3))]
        z = sum(math.exp(scale * float(sim[i, j])) for j in cand)
        expected = [math.exp(scale * float(sim[i, j])) / z if j in cand else 0.0 for j in range(n)]
        torch.testing.assert_close(probs[i], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)

    counts = torch.zeros(n, n)
    for step in range(draws):  # the real per-step uniforms
        j = sample_negatives(probs, negative_uniforms(0, step, n)[0])
        assert int(j[4]) == -1
        counts[rows[j >= 0], j[j >= 0]] += 1
    assert counts.diagonal().sum() == 0 and counts[0, 3] == 0 and counts[3, 0] == 0 and counts[:, 4].sum() == 0
    stat, dof = 0.0, 0
    for i in [0, 1, 2, 3, 5]:
        cand = probs[i] > 0
        expected = draws * probs[i][cand]
        stat += float(((counts[i][cand].double() - expected) ** 2 / expected).sum())
        dof += int(cand.sum()) - 1
    assert chi2.sf(stat, dof) > 1e-3, (stat, dof)  # deterministic draws; p-value well above any flake threshold

    uniform = negative_probs(None, allowed, scale)  # negatives: random
    torch.testing.assert_close(uniform[1], allowed[1].double() / allowed[1].sum())


def test_inverse_cdf_never_returns_a_zero_probability_column() -> None:
    probs = torch.tensor([[0.0, 0.25, 0.75, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    u = torch.tensor([1.0 - 2.0**-53, 0.5, 0.999999999])
    assert sample_negatives(probs, u).tolist() == [2, -1, 0]
    assert sample_negatives(probs[:1], torch.tensor([0.0])).tolist() == [1]


# ---- 2 ranks vs 1 process ------------------------------------------------------------------------------------------

B = 6  # rows per rank


def _case(case: str) -> dict:
    d = _data(2 * B, seed=11)
    d["mask"]["text"][B:, 4:] = False  # rank 1's text is 4 tokens long, rank 0's 5: the gather must pad
    if case == "rank1_empty":
        d["present"]["audio"][B:] = False
    return d


def _run(d: dict, rows: slice, text_len: int, reuse: bool) -> dict:
    torch.manual_seed(0)
    model = FakeModel().double()
    obj = MatchingObjective(FW, temperature=0.1, exclude_duplicates="text", seed=3).double()
    d = {**d, "mask": {**d["mask"], "text": d["mask"]["text"][:, :text_len]},
         "emb": {m: e.double() for m, e in d["emb"].items()}}
    tokens = {"text": d["tokens"]["text"][rows, :text_len].double().requires_grad_(True),
              "audio": d["tokens"]["audio"][rows].double().requires_grad_(True)}
    toks = tokens
    mask = {m: k[rows] for m, k in d["mask"].items()}
    out = ModelOutput(embeddings={m: e[rows] for m, e in d["emb"].items()}, pooled={}, tokens=toks,
                      present={m: p[rows] for m, p in d["present"].items()}, token_mask=mask,
                      fused={"text": model.fuse(toks, mask, "text")} if reuse else {})
    res = obj(out, _batch(d, rows, index=2), model)
    res.loss.backward()
    params = {f"model.{k}": p.grad for k, p in model.named_parameters()}
    params |= {f"head.{k}": p.grad for k, p in obj.head.named_parameters()}
    return {"loss": res.loss.detach(), "text": tokens["text"].grad, "audio": tokens["audio"].grad,
            "params": {k: torch.zeros(1) if g is None else g for k, g in params.items()},
            "neg_c": obj.last_negatives.context, "neg_q": obj.last_negatives.query}


CASES = [("mixed", True), ("rank1_empty", False)]  # (data, reuse the forward's fused positives)


def _rank_fn(rank: int, world: int) -> list[dict]:
    rows = slice(rank * B, (rank + 1) * B)
    return [_run(_case(case), rows, text_len=5 if rank == 0 else 4, reuse=reuse) for case, reuse in CASES]


def test_two_ranks_equal_one_process_on_the_concatenated_batch() -> None:
    world = 2
    results = spawn_ranks(_rank_fn, world=world)  # one spawn for both cases: starting ranks is the slow part
    tol = {"rtol": 1e-9, "atol": 1e-11}  # float64 throughout: only summation order differs
    for k, (case, reuse) in enumerate(CASES):
        ranks = [res[k] for res in results]
        ref = _run(_case(case), slice(None), text_len=5, reuse=reuse)
        torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), ref["loss"], **tol)
        for rank, r in enumerate(ranks):
            rows = slice(rank * B, (rank + 1) * B)
            assert torch.equal(r["neg_c"], ref["neg_c"][rows]) and torch.equal(r["neg_q"], ref["neg_q"][rows])
            # d(sum_k L_k)/dx_r = world · dL/dx_r; DeepSpeed's averaging divides by world
            t_len = r["text"].shape[1]
            torch.testing.assert_close(r["text"] / world, ref["text"][rows, :t_len], **tol)
            assert not ref["text"][rows, t_len:].any()
            torch.testing.assert_close(r["audio"] / world, ref["audio"][rows], **tol)
        if case == "rank1_empty":
            assert (ranks[1]["neg_c"] == -1).all() and (ranks[0]["neg_c"] < B).all()  # only rank 0 rows
        for name, grad in ref["params"].items():
            mean = sum(r["params"][name].expand_as(grad) for r in ranks) / world
            torch.testing.assert_close(mean, grad, **tol, msg=name)


# ---- configuration and model checks --------------------------------------------------------------------------------


def test_check_names_the_model_family_without_fusion() -> None:
    spec = _spec(fusion_dim=None, family="fusion_free")
    obj = MatchingObjective.from_config(MatchingConfig(), spec)
    with pytest.raises(ObjectiveError, match=r"objectives\.matching needs a fusion module.*family='fusion_free'"):
        obj.check(spec, where="objectives.matching")
    MatchingObjective.from_config(MatchingConfig(), _spec()).check(_spec(), where="objectives.matching")


def test_check_rejects_a_query_the_model_lacks() -> None:
    obj = MatchingObjective.from_config(MatchingConfig(query="image"), _spec())
    with pytest.raises(ObjectiveError, match="'image'"):
        obj.check(_spec(), where="objectives.matching")


@pytest.mark.parametrize(("cfg", "field"), [
    (MatchingConfig(negatives="semi"), "negatives"),  # type: ignore[arg-type]
    (MatchingConfig(temperature=0.0), "temperature"),
    (MatchingConfig(query="audio", context="audio"), "query"),
])
def test_bad_configuration_names_the_field(cfg: MatchingConfig, field: str) -> None:
    with pytest.raises(ObjectiveError, match=field):
        MatchingObjective.from_config(cfg, _spec())


def test_missing_duplicate_field_is_reported() -> None:
    torch.manual_seed(0)
    model, d = FakeModel(), _data(6)
    obj = MatchingObjective(FW, exclude_duplicates="family")
    with pytest.raises(ObjectiveError, match="exclude_duplicates='family'"):
        obj(_outputs(model, d, d["tokens"], slice(None)), _batch(d, slice(None), 0), model)

"""k-means (vs scikit-learn), Sinkhorn-Knopp (vs a float64 loop), the DeepCluster family and SwAV objectives
(vs float64 re-implementations), on one rank and over two real gloo ranks, and a ZeRO-2 DeepSpeed engine."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score
from torch import Tensor

from mmssl.objectives.base import ObjectiveError
from mmssl.objectives.clustering import (
    ClusteringConfig,
    ClusteringObjective,
    SwapClusteringObjective,
    SwAVConfig,
    pseudo_label_loss,
)
from mmssl.objectives.kmeans import kmeans, normalized_mutual_info
from mmssl.objectives.sinkhorn import sinkhorn, swav_loss
from tests.helpers.spawn import spawn_ranks

SPEC = SimpleNamespace(embed_dim=6, feature_dims={"audio": 5, "text": 7})


def _blobs(n: int, d: int, centers: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mu = 4 * torch.randn(centers, d, generator=g, dtype=dtype)
    return mu[torch.randint(centers, (n,), generator=g)] + torch.randn(n, d, generator=g, dtype=dtype)


# ---- k-means ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kmeans_matches_sklearn_from_the_same_init(dtype: torch.dtype) -> None:
    x = _blobs(500, 8, 7, seed=0, dtype=dtype)
    c, a, info = kmeans(x, 10, iters=50, seed=3)
    km = KMeans(10, init=info["init"].numpy(), n_init=1, max_iter=50, tol=0.0, algorithm="lloyd").fit(x.numpy())
    assert torch.equal(a, torch.from_numpy(km.labels_).long())
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(c, torch.from_numpy(km.cluster_centers_).to(dtype), rtol=tol, atol=tol)
    assert info["inertia"] == pytest.approx(km.inertia_, rel=1e-5)


def test_kmeans_empty_cluster_is_relocated_like_sklearn() -> None:
    x = _blobs(300, 4, 5, seed=1)
    init = x[torch.randperm(300, generator=torch.Generator().manual_seed(0))[:6]].clone()
    init[2] = 1e3  # far from every point: empty at the first assignment
    _, a, info = kmeans(x, 6, iters=30, init=init)
    km = KMeans(6, init=init.numpy(), n_init=1, max_iter=30, tol=0.0, algorithm="lloyd").fit(x.numpy())
    assert info["reseeded"] >= 1 and int(info["counts"].min()) >= 1
    assert torch.equal(a, torch.from_numpy(km.labels_).long())
    assert info["inertia"] == pytest.approx(km.inertia_, rel=1e-5)


def test_kmeans_is_seeded_and_chunking_does_not_change_it() -> None:
    x = _blobs(400, 6, 9, seed=2, dtype=torch.float32)
    c1, a1, _ = kmeans(x, 12, iters=10, seed=5)
    c2, a2, _ = kmeans(x, 12, iters=10, seed=5, chunk_elems=12 * 37)  # 37 rows per chunk
    assert torch.equal(a1, a2) and torch.equal(c1, c2)
    _, a3, _ = kmeans(x, 12, iters=10, seed=6)
    assert not torch.equal(a1, a3)


@pytest.mark.parametrize("spherical", [False, True])
def test_kmeans_duplicates_with_more_clusters_than_distinct_points(spherical: bool) -> None:
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).repeat(10, 1)  # 3 distinct points
    c, a, info = kmeans(x, 7, iters=10, seed=0, spherical=spherical)
    assert torch.bincount(a, minlength=7).min() >= 1
    assert torch.isfinite(c).all() and math.isfinite(info["inertia"]) and info["inertia"] < 1e-9


def test_spherical_kmeans_matches_a_plain_loop() -> None:
    x = _blobs(120, 5, 4, seed=4)
    c, a, info = kmeans(x, 4, iters=8, spherical=True, seed=1)
    xs = [row / row.norm() for row in x]
    cs = [row / row.norm() for row in info["init"]]
    for _ in range(8):  # Lloyd on the sphere: max cosine, then normalised means
        lab = [max(range(4), key=lambda k, p=p: float(p @ cs[k])) for p in xs]
        cs = [sum(p for p, lb in zip(xs, lab, strict=True) if lb == k) for k in range(4)]
        cs = [v / v.norm() for v in cs]
    lab = [max(range(4), key=lambda k, p=p: float(p @ cs[k])) for p in xs]
    assert a.tolist() == lab
    torch.testing.assert_close(c, torch.stack(cs), rtol=1e-10, atol=1e-10)


def test_nmi_matches_sklearn() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(5, (200,), generator=g), torch.randint(7, (200,), generator=g)
    b[:100] = a[:100]
    assert normalized_mutual_info(a, b) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)


# ---- Sinkhorn -----------------------------------------------------------------------------------------------
def _sinkhorn_loop(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """SwAV's distributed_sinkhorn on one process, written with explicit loops in float64."""
    q = torch.exp(scores.double() / eps).T.clone()  # K x B
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        for r in range(k):
            q[r] = q[r] / q[r].sum() / k
        for col in range(b):
            q[:, col] = q[:, col] / q[:, col].sum() / b
    return (q * b).T


def _scores(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, 16, generator=g), dim=1)
    return z @ c.T


def test_sinkhorn_equals_the_float64_loop() -> None:
    s = _scores(12, 5, 0)
    torch.testing.assert_close(sinkhorn(s, 0.05, 3), _sinkhorn_loop(s, 0.05, 3).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sinkhorn(s.double(), 0.1, 7), _sinkhorn_loop(s, 0.1, 7), rtol=1e-12, atol=1e-14)
    valid = torch.tensor([True, False] * 6)  # absent rows take no part and get zero codes
    q = sinkhorn(s.double(), 0.05, 3, valid=valid)
    torch.testing.assert_close(q[valid], _sinkhorn_loop(s[valid], 0.05, 3), rtol=1e-12, atol=1e-14)
    assert q[~valid].abs().max() == 0


def test_sinkhorn_marginals() -> None:
    n, k = 2048, 16
    s = _scores(n, k, 1)
    q = sinkhorn(s, 0.05, 300)
    torch.testing.assert_close(q.sum(1), torch.ones(n), rtol=0, atol=1e-5)  # every code is a distribution
    torch.testing.assert_close(q.sum(0), torch.full((k,), n / k), rtol=1e-4, atol=0)  # balanced prototypes
    hard = torch.bincount(q.argmax(1), minlength=k).float()  # hard assignment: within 15% of N/K
    assert (hard - n / k).abs().max() <= 0.15 * n / k, hard
    raw = torch.bincount(s.argmax(1), minlength=k).float()  # what balancing fixes (not asserted tight)
    assert (hard - n / k).abs().max() < (raw - n / k).abs().max()


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_sinkhorn_collapse_and_extreme_scores(scale: float) -> None:
    q = sinkhorn(torch.full((64, 8), 0.7), 0.05, 3)  # all features equal: uniform codes
    torch.testing.assert_close(q, torch.full((64, 8), 1 / 8))
    q = sinkhorn(_scores(64, 8, 2) * scale, 0.05, 3)  # exp(s/ε) would overflow in the plain form
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(64))


# ---- DeepCluster family -------------------------------------------------------------------------------------
def _objective(variant: str = "deepcluster", mods: tuple[str, ...] = ("audio",), **kw) -> ClusteringObjective:
    cfg = ClusteringConfig(variant=variant, modalities=list(mods), **{"num_clusters": 4, "samples_per_refresh": 64,
                                                                     **kw})
    return ClusteringObjective.from_config(cfg, SPEC)


def _outputs(n: int, seed: int, present: dict[str, torch.Tensor] | None = None,
             dims: dict[str, int] | None = None) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    dims = dims or {"audio": 6, "text": 6}
    emb = {m: torch.randn(n, d, generator=g) for m, d in dims.items()}
    pres = present or {m: torch.ones(n, dtype=torch.bool) for m in dims}
    return SimpleNamespace(embeddings=emb, pooled=emb, present=pres)


def _ref_ce(w: torch.Tensor, b: torch.Tensor, f: torch.Tensor, labels: list[int], rows: list[int]) -> torch.Tensor:
    """Mean over ``rows`` of -log softmax(W f + b)[label], with explicit sums in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for i in rows:
        logits = [sum(w[k, j].double() * f[i, j].double() for j in range(f.shape[1])) + b[k].double()
                  for k in range(w.shape[0])]
        total = total - (logits[labels[i]] - torch.log(sum(torch.exp(v) for v in logits)))
    return total / len(rows)


def test_deepcluster_loss_matches_float64_reference_with_fixed_labels() -> None:
    obj = _objective(mods=("audio", "text"))
    keys = [f"k{i}" for i in range(10)]
    labels = {"audio": [i % 4 for i in range(10)], "text": [(3 * i + 1) % 4 for i in range(10)]}
    state = {"step": 0, "labels": {m: {"keys": keys[:8], "labels": torch.tensor(v[:8])} for m, v in labels.items()}}
    obj.set_extra_state(state)  # k8, k9: no label
    present = {"audio": torch.tensor([True] * 9 + [False]), "text": torch.tensor([False] + [True] * 9)}
    out = _outputs(10, 0, present)
    out.embeddings["audio"][9] = float("nan")  # absent rows may hold anything
    out.embeddings = {m: e.requires_grad_(True) for m, e in out.embeddings.items()}
    res = obj(out, SimpleNamespace(keys=keys))
    res.loss.backward()
    ref_terms = []
    for m, rows in (("audio", list(range(8))), ("text", list(range(1, 8)))):
        head = obj.heads[f"{m}_to_{m}"]
        f = out.embeddings[m].detach().clone().double().requires_grad_(True)
        ref = _ref_ce(head.weight.detach(), head.bias.detach(), f, labels[m], rows)
        ref.backward()
        ref_terms.append(ref)
        torch.testing.assert_close(res.terms[f"{m}_to_{m}"].double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.embeddings[m].grad.double(), f.grad / 2, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(res.loss.double(), sum(ref_terms) / 2, rtol=1e-5, atol=1e-6)
    assert float(res.metrics["audio_to_audio/labelled"]) == pytest.approx(0.8)


def test_pseudo_label_loss_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, -1, 2, -1, 1])
    assert torch.autograd.gradcheck(lambda x: pseudo_label_loss(x, labels)[0], (logits,))


def test_a_modality_missing_from_the_outputs_counts_as_absent() -> None:
    obj = _objective("xdc", ("audio", "text"), samples_per_refresh=20)
    out = _outputs(20, 3, dims={"audio": 6})  # no text in this batch at all
    keys = [f"m{i}" for i in range(20)]
    with pytest.warns(UserWarning, match="0 samples for 'text'"):
        metrics = obj.refresh(0, _source([(keys, out)]))
    assert len(obj.labels["audio"]) == 20 and obj.labels["text"] == {} and metrics["text/skipped"] == 1
    res = obj(out, SimpleNamespace(keys=keys))
    res.loss.backward()
    assert float(res.terms["text_to_audio"]) == 0 and float(res.terms["audio_to_text"]) == 0
    assert obj.heads["text_to_audio"].weight.grad is not None
    swav = SwapClusteringObjective(["audio", "text"], 6, num_prototypes=4)
    loss = swav(out, SimpleNamespace(keys=keys)).loss
    loss.backward()
    assert float(loss.detach()) == 0 and swav.prototypes.grad is not None


def test_zero_loss_before_first_refresh_reaches_every_head() -> None:
    obj = _objective("mdc", ("audio", "text"))
    res = obj(_outputs(5, 0), SimpleNamespace(keys=list("abcde")))
    res.loss.backward()
    assert float(res.loss.detach()) == 0.0
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in obj.parameters())


def _source(batches: list, closed: list | None = None) -> Callable[[], Iterator]:
    def features() -> Iterator:
        try:
            yield from batches
        finally:
            if closed is not None:
                closed.append(True)

    return features


def _feature_batches(n_batches: int, rows: int, seed: int, prefix: str = "s") -> tuple[list, torch.Tensor]:
    x = _blobs(n_batches * rows, 6, 5, seed=seed, dtype=torch.float32)
    out = []
    for b in range(n_batches):
        emb = x[b * rows : (b + 1) * rows]
        pres = torch.ones(rows, dtype=torch.bool)
        pres[0] = False  # first row of each batch lacks audio
        out.append(([f"{prefix}{b}_{i}" for i in range(rows)],
                    SimpleNamespace(embeddings={"audio": emb}, pooled={}, present={"audio": pres})))
    return out, x


def test_refresh_labels_equal_sklearn_kmeans_and_survive_state_dict() -> None:
    batches, x = _feature_batches(6, 10, seed=0)
    closed: list = []
    obj = _objective(num_clusters=5, samples_per_refresh=45, spherical=False, kmeans_iters=30)
    w_before = obj.heads["audio_to_audio"].weight
    ptr = w_before.data_ptr()
    old = w_before.detach().clone()
    metrics = obj.refresh(100, _source(batches, closed))
    assert closed == [True]  # stopped after 45 samples and closed the source
    rows = [i for i in range(45) if i % 10 != 0]
    keys = [f"s{i // 10}_{i % 10}" for i in rows]
    assert sorted(obj.labels["audio"]) == sorted(keys)
    init = obj.last_refresh["audio"]["init"]
    km = KMeans(5, init=init.double().numpy(), n_init=1, max_iter=30, tol=0.0, algorithm="lloyd")
    km.fit(x[rows].double().numpy())
    assert [obj.labels["audio"][k] for k in keys] == km.labels_.tolist()
    assert metrics["audio/samples"] == len(rows) and metrics["audio/min_size"] >= 1
    assert 0 < metrics["audio/entropy"] <= 1
    head = obj.heads["audio_to_audio"]
    assert head.weight is w_before and head.weight.data_ptr() == ptr and not torch.equal(head.weight, old)
    assert float(head.weight.detach().std()) == pytest.approx(0.01, rel=0.3) and head.bias.abs().max() == 0
    buf = io.BytesIO()
    torch.save(obj.state_dict(), buf)
    fresh = _objective(num_clusters=5, samples_per_refresh=45, spherical=False)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert fresh.labels == obj.labels and fresh.refresh_step == 100
    torch.testing.assert_close(fresh.heads["audio_to_audio"].weight, head.weight)


def test_xdc_targets_are_the_other_modalitys_clusters() -> None:
    n = 40
    g = torch.Generator().manual_seed(0)
    group_a = torch.arange(n) % 2  # audio splits by parity, text by halves: independent partitions
    group_t = (torch.arange(n) >= n // 2).long()
    audio = torch.randn(n, 6, generator=g) * 0.05 + torch.tensor([5.0, 0, 0, 0, 0, 0]) * (2 * group_a - 1)[:, None]
    text = torch.randn(n, 6, generator=g) * 0.05 + torch.tensor([0, 5.0, 0, 0, 0, 0]) * (2 * group_t - 1)[:, None]
    keys = [f"x{i}" for i in range(n)]
    pres = torch.ones(n, dtype=torch.bool)
    outs = SimpleNamespace(embeddings={"audio": audio, "text": text}, pooled={}, present={"audio": pres,
                                                                                          "text": pres})
    obj = _objective("xdc", ("audio", "text"), num_clusters=2, samples_per_refresh=n)
    obj.refresh(0, _source([(keys, outs)]))
    la = torch.tensor([obj.labels["audio"][k] for k in keys])
    lt = torch.tensor([obj.labels["text"][k] for k in keys])
    assert normalized_mutual_info(la, group_a) == pytest.approx(1.0)
    assert normalized_mutual_info(lt, group_t) == pytest.approx(1.0)
    assert [(m, c) for m, c in obj.pairs] == [("audio", "text"), ("text", "audio")]
    res = obj(outs, SimpleNamespace(keys=keys))
    for m, other, own in (("audio", lt, la), ("text", la, lt)):
        head = obj.heads[f"{m}_to_{'text' if m == 'audio' else 'audio'}"]
        logits = outs.embeddings[m] @ head.weight.detach().T + head.bias.detach()
        expected = torch.nn.functional.cross_entropy(logits, other)
        assert float(res.terms[f"{m}_to_{'text' if m == 'audio' else 'audio'}"]) == pytest.approx(float(expected))
        assert float(expected) != pytest.approx(float(torch.nn.functional.cross_entropy(logits, own)), rel=1e-3)


def test_cdc_clusters_rows_with_every_modality_and_mdc_has_all_heads() -> None:
    out = _outputs(20, 1, {"audio": torch.arange(20) % 3 != 0, "text": torch.ones(20, dtype=torch.bool)})
    keys = [f"c{i}" for i in range(20)]
    cdc = _objective("cdc", ("audio", "text"), samples_per_refresh=20)
    cdc.refresh(0, _source([(keys, out)]))
    assert set(cdc.labels) == {"joint"} and sorted(cdc.labels["joint"]) == sorted(k for i, k in enumerate(keys)
                                                                                 if i % 3)
    assert sorted(cdc.heads) == ["audio_to_joint", "text_to_joint"]
    mdc = _objective("mdc", ("audio", "text"), feature="pooled")
    assert sorted(mdc.heads) == ["audio_to_audio", "audio_to_text", "text_to_audio", "text_to_text"]
    assert mdc.heads["text_to_audio"].in_features == 7


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ObjectiveError, match=r"num_clusters=128.*samples_per_refresh=64"):
        _objective(num_clusters=128)
    with pytest.raises(ObjectiveError, match="exactly 2 modalities"):
        _objective("xdc", ("audio",))
    with pytest.raises(ObjectiveError, match="'deepclustr'"):
        _objective("deepclustr")
    with pytest.raises(ObjectiveError, match="'tokens'"):
        _objective(feature="tokens")


# ---- SwAV ---------------------------------------------------------------------------------------------------
def _swav_ref(za: Tensor, zb: Tensor, c: Tensor, tau: float, eps: float, iters: int) -> Tensor:
    """Float64 re-implementation: normalise, codes by the loop Sinkhorn, swapped cross-entropy, row mean."""
    za = za / za.norm(dim=1, keepdim=True)
    zb = zb / zb.norm(dim=1, keepdim=True)
    c = c / c.norm(dim=1, keepdim=True)
    sa, sb = za @ c.T, zb @ c.T
    qa, qb = _sinkhorn_loop(sa.detach(), eps, iters), _sinkhorn_loop(sb.detach(), eps, iters)
    total = 0
    for i in range(za.shape[0]):
        lpa = sa[i] / tau - torch.log(torch.exp(sa[i] / tau).sum())
        lpb = sb[i] / tau - torch.log(torch.exp(sb[i] / tau).sum())
        total = total - 0.5 * ((qb[i] * lpa).sum() + (qa[i] * lpb).sum())
    return total / za.shape[0]


def _swav_inputs(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 8, generator=g, dtype=torch.float64), torch.randn(n, 8, generator=g, dtype=torch.float64),
            torch.randn(5, 8, generator=g, dtype=torch.float64))


def _swav_grads(za: Tensor, zb: Tensor, c: Tensor, fn: Callable[..., Tensor]) -> list[Tensor]:
    leaves = [t.clone().requires_grad_(True) for t in (za, zb, c)]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach(), *[t.grad for t in leaves]]


def test_swav_loss_and_gradients_match_float64_reference() -> None:
    za, zb, c = _swav_inputs(12, 0)
    ours = _swav_grads(za, zb, c, lambda a, b, p: swav_loss(a, b, p, temperature=0.1, epsilon=0.05)[0])
    ref = _swav_grads(za, zb, c, lambda a, b, p: _swav_ref(a, b, p, 0.1, 0.05, 3))
    for mine, theirs in zip(ours, ref, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    valid = torch.tensor([True] * 9 + [False] * 3)
    loss, _ = swav_loss(za, zb, c, valid=valid)
    torch.testing.assert_close(loss, _swav_ref(za[:9], zb[:9], c, 0.1, 0.05, 3), rtol=1e-10, atol=1e-12)
    loss32, _ = swav_loss(za.float(), zb.float(), c.float(), valid=valid)  # the float32 path
    torch.testing.assert_close(loss32.double(), _swav_ref(za[:9], zb[:9], c, 0.1, 0.05, 3), rtol=1e-5, atol=1e-6)


def test_swav_collapse_is_finite_and_freezing_zeroes_prototype_gradients() -> None:
    obj = SwapClusteringObjective.from_config(SwAVConfig(modalities=["audio", "audio@1"], num_prototypes=8,
                                                         freeze_prototypes_steps=1), SPEC)
    same = torch.ones(16, 6, requires_grad=True)
    out = SimpleNamespace(embeddings={"audio": same, "audio@1": same}, present={"audio": torch.ones(16).bool(),
                                                                                "audio@1": torch.ones(16).bool()})
    res = obj(out)
    res.loss.backward()
    assert torch.isfinite(res.loss) and torch.isfinite(same.grad).all()
    assert obj.prototypes.grad is not None and obj.prototypes.grad.abs().max() == 0
    obj.after_step(None)
    obj.prototypes.grad = None
    obj(_outputs(16, 0, dims={"audio": 6, "audio@1": 6})).loss.backward()
    assert obj.prototypes.grad.abs().max() > 0
    assert obj.state_dict()["_extra_state"] == {"steps_done": 1}


# ---- two ranks ----------------------------------------------------------------------------------------------
def _two_rank_main(rank: int, world: int, ckpt: str) -> dict:
    torch.manual_seed(0)
    batches, _ = _feature_batches(3, 8 + 4 * rank, seed=rank, prefix=f"r{rank}")  # uneven rows per rank
    obj = _objective(num_clusters=4, samples_per_refresh=200)  # every rank takes all its rows
    obj.refresh(7, _source(batches))
    za, zb, c = _swav_inputs(16, 1)
    rows = slice(rank * 8, (rank + 1) * 8)
    valid = torch.tensor([True, True, False, True] * 4)[rows]
    got = _swav_grads(za[rows], zb[rows], c, lambda a, b, p: swav_loss(a, b, p, valid=valid)[0])
    return {"labels": obj.labels, "codes": sinkhorn(za[rows] @ c.T, 0.05, 3, valid=valid), "swav": got,
            "zero2": _zero2_part(rank, world, ckpt)}


def _zero2_part(rank: int, world: int, ckpt: str) -> dict:
    """A ZeRO-2 engine around the objective: the head reset must reach the optimizer's fp32 master copy."""
    import deepspeed

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    obj = _objective(num_clusters=4, samples_per_refresh=60, spherical=False)
    task = torch.nn.ModuleDict({"objective": obj})
    engine, *_ = deepspeed.initialize(model=task, optimizer=torch.optim.AdamW(task.parameters(), lr=0.05), config={
        "train_micro_batch_size_per_gpu": 12, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1})
    batches, _ = _feature_batches(3, 12, seed=rank, prefix=f"r{rank}")

    def step() -> None:
        keys, out = batches[0]
        engine.backward(obj(out, SimpleNamespace(keys=keys)).loss)
        engine.step()

    obj.refresh(0, _source(batches))
    for _ in range(3):
        step()
    trained = obj.heads["audio_to_audio"].weight.detach().clone()
    obj.refresh(1, _source(batches))  # re-initialises the heads and the optimizer's fp32 master copy
    reset = obj.heads["audio_to_audio"].weight.detach().clone()
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    step()
    after = obj.heads["audio_to_audio"].weight.detach().clone()
    engine.save_checkpoint(ckpt, tag="t")
    labels = dict(obj.labels["audio"])
    obj.set_extra_state({"step": -1, "labels": {"audio": {"keys": [], "labels": torch.zeros(0).long()}}})
    engine.load_checkpoint(ckpt, tag="t")
    return {"trained": trained, "reset": reset, "after": after, "labels": labels,
            "loaded": dict(obj.labels["audio"]), "step": obj.refresh_step}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One spawn of two gloo ranks serves both tests below."""
    return spawn_ranks(_two_rank_main, str(tmp_path_factory.mktemp("zero2")))


@pytest.mark.distributed
def test_two_ranks_equal_one_rank_over_the_concatenated_batch(two_ranks: list[dict]) -> None:
    results = two_ranks
    assert results[0]["labels"] == results[1]["labels"]
    one = _objective(num_clusters=4, samples_per_refresh=200)
    one.refresh(7, _source(_feature_batches(3, 8, 0, "r0")[0] + _feature_batches(3, 12, 1, "r1")[0]))
    assert one.labels == results[0]["labels"]
    za, zb, c = _swav_inputs(16, 1)
    valid = torch.tensor([True, True, False, True] * 4)
    codes = torch.cat([r["codes"] for r in results])
    torch.testing.assert_close(codes, sinkhorn(za @ c.T, 0.05, 3, valid=valid), rtol=1e-10, atol=1e-12)
    ref = _swav_grads(za, zb, c, lambda a, b, p: swav_loss(a, b, p, valid=valid)[0])
    losses = torch.stack([r["swav"][0] for r in results])
    torch.testing.assert_close(losses.mean(), ref[0], rtol=1e-10, atol=1e-12)
    for rank, r in enumerate(results):  # d/dz of this rank's rows: DeepSpeed divides by world
        rows = slice(rank * 8, (rank + 1) * 8)
        torch.testing.assert_close(r["swav"][1] / 2, ref[1][rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r["swav"][2] / 2, ref[2][rows], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((results[0]["swav"][3] + results[1]["swav"][3]) / 2, ref[3], rtol=1e-10, atol=1e-12)


@pytest.mark.distributed
def test_head_reset_survives_a_zero2_optimizer_step_and_labels_a_checkpoint(two_ranks: list[dict]) -> None:
    for r in (res["zero2"] for res in two_ranks):
        assert not torch.allclose(r["trained"], r["reset"])
        torch.testing.assert_close(r["after"], r["reset"], rtol=0, atol=0)  # lr=0 step: the reset values stay
        assert r["loaded"] == r["labels"] and len(r["labels"]) == 60 - 6 and r["step"] == 1

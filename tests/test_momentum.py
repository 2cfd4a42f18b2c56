"""Momentum distillation with feature queues (ALBEF ITC / MoCo): the loss against a float64 loop written from the
formula, the queue's FIFO semantics, the EMA, two real gloo ranks against one, and the state_dict round trip.

Tolerances: float32 against the float64 loop rtol 1e-5 / atol 1e-6; distributed against single-process rtol 1e-5 /
atol 1e-6 (gradients atol 1e-7); queue contents identical (torch.equal) across ranks.
"""

from __future__ import annotations

import collections
import io
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmssl.data_pipelines.batch import Batch
from mmssl.objectives.base import ObjectiveError
from mmssl.objectives.contrastive import contrastive_loss
from mmssl.objectives.ids import UNKNOWN_ID, meta_ids
from mmssl.objectives.momentum import MomentumContrastiveConfig, MomentumContrastiveObjective, momentum_contrastive_loss
from mmssl.objectives.queue import FeatureQueue
from tests.helpers.spawn import spawn_ranks

E = 8
DIMS = {"audio": 6, "text": 5}


class FakeModel(nn.Module):
    """Two Linear "towers" returning ``.embeddings`` / ``.present`` like a fusion-free model."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.towers = nn.ModuleDict({m: nn.Linear(d, E) for m, d in DIMS.items()})

    def forward(self, inputs, present=None):
        emb = {m: self.towers[m.split("@")[0]](x) for m, x in inputs.items()}
        pres = {m: present[m] if present and m in present else torch.ones(x.shape[0], dtype=torch.bool)
                for m, x in inputs.items()}
        return SimpleNamespace(embeddings=emb, present=pres)


def _batch(n: int, seed: int, absent: tuple[int, ...] = ()) -> Batch:
    g = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(n, d, generator=g) for m, d in DIMS.items()}
    text_present = torch.ones(n, dtype=torch.bool)
    text_present[list(absent)] = False
    return Batch(inputs=inputs, present={"audio": torch.ones(n, dtype=torch.bool), "text": text_present},
                 keys=[f"s{seed}_{i}" for i in range(n)])


def _student(batch: Batch, seed: int) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed + 100)
    emb = {m: torch.randn(len(batch), E, generator=g).requires_grad_(True) for m in DIMS}
    return SimpleNamespace(embeddings=emb, present=dict(batch.present))


def _objective(seed: int = 0, **kw) -> tuple[MomentumContrastiveObjective, FakeModel]:
    kw = {"queue_size": 7, "alpha": 0.4, **kw}
    obj = MomentumContrastiveObjective([("audio", "text")], embed_dim=E, **kw)
    model = FakeModel(seed)
    obj.bind(model)
    return obj, model


# --- a plain float64 re-implementation of the formula --------------------------------------------------------
def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt(sum(v[k] * v[k] for k in range(v.shape[0])))


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return sum(u[k] * v[k] for k in range(u.shape[0]))


def _ref_loss(a, b, a_t, b_t, s, queue_a, queue_b, alpha, valid) -> torch.Tensor:
    """1/(2N) Σ_i Σ_dir -Σ_j y_ij log p_ij, columns [teacher batch ; queue], y = (1-α)onehot + α softmax(teacher)."""
    a, b, a_t, b_t = (x.double() for x in (a, b, a_t, b_t))
    idx = [i for i in range(a.shape[0]) if valid[i]]
    total = torch.zeros((), dtype=torch.float64)
    for x, x_t, y_t, queue in ((a, a_t, b_t, queue_b), (b, b_t, a_t, queue_a)):
        cols = [_unit(y_t[j]) for j in idx] + [_unit(q.double()) for q in queue]
        for k, i in enumerate(idx):
            xi, xti = _unit(x[i]), _unit(x_t[i]).detach()
            z = [s * _dot(xi, c) for c in cols]
            zt = [float(s.detach()) * _dot(xti, c) for c in cols]
            lse = torch.log(sum(torch.exp(v) for v in z))
            norm_t = sum(math.exp(float(v)) for v in zt)
            for j in range(len(cols)):
                y = (1 - alpha) * (j == k) + alpha * math.exp(float(zt[j])) / norm_t
                total = total - y * (z[j] - lse)
    return total / (2 * max(1, len(idx)))


def _embeddings(n: int, q: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(r, E, generator=g) for r in (n, n, n, n, q, q)]


def test_loss_and_gradients_match_the_float64_loop() -> None:
    a, b, a_t, b_t, qa, qb = _embeddings(6, 5, seed=1)
    valid = torch.tensor([True, True, False, True, True, False])
    for alpha in (0.0, 0.4, 1.0):
        a_, b_ = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        s = torch.tensor(12.5, requires_grad=True)
        out = momentum_contrastive_loss(a_, b_, a_t, b_t, s, queue_a=qa, queue_b=qb, alpha=alpha, valid=valid)
        out.loss.backward()
        a64, b64 = a.double().requires_grad_(True), b.double().requires_grad_(True)
        s64 = torch.tensor(12.5, dtype=torch.float64, requires_grad=True)
        ref = _ref_loss(a64, b64, a_t, b_t, s64, qa, qb, alpha, valid)
        ref.backward()
        torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
        for mine, theirs in ((a_.grad, a64.grad), (b_.grad, b64.grad), (s.grad, s64.grad)):
            torch.testing.assert_close(mine.double(), theirs, rtol=1e-5, atol=1e-6)
        assert a_.grad[~valid].abs().max() == 0  # absent rows contribute nothing


def test_gradcheck_float64() -> None:
    a, b, a_t, b_t, qa, qb = (x.double() for x in _embeddings(4, 3, seed=2))
    valid = torch.tensor([True, False, True, True])

    def fn(x, y):  # not w.r.t. s: the teacher's targets depend on s but are detached (stop-gradient) by design
        return momentum_contrastive_loss(x, y, a_t, b_t, 7.0, queue_a=qa, queue_b=qb, alpha=0.3, valid=valid).loss

    assert torch.autograd.gradcheck(fn, (a.requires_grad_(True), b.requires_grad_(True)), eps=1e-6, atol=1e-6,
                                      fast_mode=True)


def test_alpha_zero_empty_queue_is_infonce_against_teacher_columns() -> None:
    a, b, a_t, b_t, _, _ = _embeddings(7, 0, seed=3)
    s = torch.tensor(9.0)
    loss = momentum_contrastive_loss(a, b, a_t, b_t, s, alpha=0.0).loss
    an, bn, atn, btn = (F.normalize(x, dim=-1) for x in (a, b, a_t, b_t))
    labels = torch.arange(7)
    plain = (F.cross_entropy(s * an @ btn.T, labels) + F.cross_entropy(s * bn @ atn.T, labels)) / 2
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-6)
    # a teacher equal to the student gives CLIP's loss value
    same = momentum_contrastive_loss(a, b, a, b, s, alpha=0.0).loss
    torch.testing.assert_close(same, contrastive_loss(a, b, s)[0], rtol=1e-6, atol=1e-6)


# --- the queue ------------------------------------------------------------------------------------------------
def test_queue_fifo_wraparound_and_partial_fill() -> None:
    q = FeatureQueue(5, 2)
    rows = lambda *v: torch.tensor([[x, -x] for x in v], dtype=torch.float32)  # noqa: E731
    assert int(q.filled) == 0 and not q.mask().any()
    q.enqueue(rows(1, 2, 3), torch.tensor([1, 2, 3]))
    assert int(q.ptr) == 3 and int(q.filled) == 3 and q.mask().tolist() == [True] * 3 + [False] * 2
    assert q.ordered()[0][:, 0].tolist() == [1, 2, 3] and q.ordered()[1].tolist() == [1, 2, 3]
    q.enqueue(rows(4, 5, 6), torch.tensor([4, 5, 6]))
    assert int(q.ptr) == 1 and int(q.filled) == 5 and q.mask().all()
    assert q.feats[:, 0].tolist() == [6, 2, 3, 4, 5]
    assert q.ordered()[0][:, 0].tolist() == [2, 3, 4, 5, 6]
    q.enqueue(rows(7, 8, 9), torch.tensor([7, 8, 9]), torch.tensor([True, False, True]))  # absent row skipped
    assert q.ordered()[0][:, 0].tolist() == [4, 5, 6, 7, 9] and int(q.ptr) == 3
    q.enqueue(rows(*range(10, 22)))  # more rows than slots: the last 5 survive, ids unknown
    assert q.ordered()[0][:, 0].tolist() == [17, 18, 19, 20, 21] and int(q.ptr) == (3 + 12) % 5
    assert (q.ids == UNKNOWN_ID).all()


def test_queue_matches_a_deque_on_random_writes() -> None:
    rng = random.Random(0)
    q, ref, counter = FeatureQueue(6, 1), collections.deque(maxlen=6), 0
    for _ in range(40):
        n = rng.randint(0, 9)
        values = torch.arange(counter, counter + n, dtype=torch.float32).unsqueeze(1)
        valid = torch.tensor([rng.random() < 0.8 for _ in range(n)], dtype=torch.bool)
        q.enqueue(values, values.squeeze(1).long(), valid)
        ref.extend(v for v, ok in zip(range(counter, counter + n), valid.tolist(), strict=True) if ok)
        counter += n
        feats, ids = q.ordered()
        assert feats[:, 0].tolist() == list(ref) and ids.tolist() == list(ref)
        assert int(q.filled) == len(ref) and q.feats[q.mask()].shape[0] == len(ref)


def test_sample_ids_are_stable_and_distinct() -> None:
    ids = meta_ids(["a", "b", "a"])
    assert ids[0] == ids[2] and ids[0] != ids[1] and (ids >= 0).all()
    assert meta_ids(["a"]).tolist() == meta_ids(["a"]).tolist() and meta_ids([None]).tolist() == [UNKNOWN_ID]


# --- the objective ---------------------------------------------------------------------------------------------
def test_objective_forward_matches_loop_and_enqueues_teacher_features() -> None:
    obj, _ = _objective(seed=0)
    batch = _batch(6, seed=5, absent=(2,))
    # pre-fill: 4 old entries, one of which is a stale copy of a current sample (excluded from the columns)
    g = torch.Generator().manual_seed(9)
    old_a, old_b = F.normalize(torch.randn(4, E, generator=g), dim=-1), F.normalize(torch.randn(4, E, generator=g),
                                                                                     dim=-1)
    old_ids = meta_ids(["x0", batch.keys[3], "x2", "x3"])
    q = obj.queues["audio-text"]
    q["audio"].enqueue(old_a, old_ids, gather=False)
    q["text"].enqueue(old_b, old_ids, gather=False)
    out = _student(batch, seed=5)
    result = obj(out, batch)
    with torch.no_grad():
        teacher = obj.teacher(batch.inputs, batch.present).embeddings
    keep = torch.tensor([0, 2, 3])
    valid = batch.present["audio"] & batch.present["text"]
    a64 = out.embeddings["audio"].detach().double().requires_grad_(True)
    ref = _ref_loss(a64, out.embeddings["text"].detach(), teacher["audio"], teacher["text"],
                    torch.tensor(1 / 0.07, dtype=torch.float64), old_a[keep], old_b[keep], 0.4, valid)
    torch.testing.assert_close(result.loss.double(), ref, rtol=1e-5, atol=1e-6)
    result.loss.backward()
    ref.backward()
    torch.testing.assert_close(out.embeddings["audio"].grad.double(), a64.grad, rtol=1e-5, atol=1e-6)
    # the 5 complete rows are queued after the 4 old ones (K = 7: wraps, the 2 oldest drop out)
    feats, ids = q["audio"].ordered()
    expect = torch.cat([old_a, F.normalize(teacher["audio"][valid], dim=-1)])[-7:]
    torch.testing.assert_close(feats, expect)
    assert ids.tolist() == torch.cat([old_ids, meta_ids(batch.keys)[valid]])[-7:].tolist()
    assert int(q["text"].ptr) == (4 + 5) % 7
    # evaluation mode reads the queue but does not write it; the teacher follows the mode
    obj.eval()
    assert not obj.teacher.training
    before = q["audio"].feats.clone()
    obj(_student(batch, seed=6), batch)
    assert torch.equal(before, q["audio"].feats)


def test_ema_update_is_exact_and_counts_steps() -> None:
    obj, model = _objective(seed=0, momentum=0.9, alpha_warmup_steps=4)
    t0 = {n: p.detach().clone().double() for n, p in obj.teacher.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    obj.after_step(model)
    student = dict(model.named_parameters())
    for name, p in obj.teacher.named_parameters():
        expect = 0.9 * t0[name] + 0.1 * student[name].detach().double()
        torch.testing.assert_close(p.detach().double(), expect, rtol=0, atol=1e-6)
        assert not p.requires_grad
        assert p.data_ptr() == obj.teacher_fp32._buffers[name.replace(".", "__")].data_ptr()  # fp32: shared
    obj.after_step(model)
    assert int(obj.steps) == 2 and obj.current_alpha() == pytest.approx(0.2)


def test_ema_keeps_float32_masters_when_the_teacher_is_cast_to_bf16() -> None:
    obj, model = _objective(seed=0, momentum=0.995)
    t0 = {n: p.detach().clone().double() for n, p in obj.teacher.named_parameters()}
    for p in obj.parameters():  # what DeepSpeed's bf16 mode does to every parameter, frozen ones included
        p.data = p.data.to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    for _ in range(50):
        obj.after_step(model)
    student = dict(model.named_parameters())
    for name, p in obj.teacher.named_parameters():
        master = obj.teacher_fp32._buffers[name.replace(".", "__")]
        decay = 0.995 ** 50
        expect = decay * t0[name] + (1 - decay) * student[name].detach().double()
        torch.testing.assert_close(master.double(), expect, rtol=0, atol=1e-5)
        assert p.dtype == torch.bfloat16 and torch.equal(p, master.to(torch.bfloat16))


def test_zero3_partitioned_parameters_are_refused() -> None:
    obj, model = _objective()
    model.towers["audio"].weight.ds_id = 0  # what ZeRO-3 attaches to a partitioned parameter
    with pytest.raises(ObjectiveError, match="zero_stage"):
        obj.after_step(model)


def test_state_dict_round_trip_restores_queue_pointer_and_teacher() -> None:
    obj, model = _objective(seed=0)
    for step in range(3):
        out = _student(_batch(4, seed=step), seed=step)
        obj(out, _batch(4, seed=step)).loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        obj.after_step(model)
    buf = io.BytesIO()
    torch.save(obj.state_dict(), buf)
    fresh, _ = _objective(seed=123)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True), strict=True)
    state, restored = obj.state_dict(), fresh.state_dict()
    assert set(state) == set(restored)
    for key in ("queues.audio-text.audio.feats", "queues.audio-text.text.ids", "queues.audio-text.audio.ptr",
                "queues.audio-text.text.filled", "teacher.towers.audio.weight", "teacher_fp32.towers__text__bias",
                "steps"):
        assert key in state
    for key in state:
        assert torch.equal(state[key], restored[key]), key
    assert int(fresh.queues["audio-text"]["audio"].ptr) == (3 * 4) % 7
    batch = _batch(4, seed=10)
    torch.testing.assert_close(fresh(_student(batch, 10), batch).loss, obj(_student(batch, 10), batch).loss)


def test_missing_modality_contributes_nothing() -> None:
    obj, _ = _objective()
    batch = _batch(4, seed=1)
    batch = Batch(inputs={"audio": batch.inputs["audio"]}, present={"audio": batch.present["audio"]}, keys=batch.keys)
    out = SimpleNamespace(embeddings={"audio": torch.randn(4, E, requires_grad=True)}, present=dict(batch.present))
    assert float(obj(out, batch).loss.detach()) == 0.0 and int(obj.queues["audio-text"]["audio"].filled) == 0


def test_bad_configuration_names_the_field() -> None:
    with pytest.raises(ObjectiveError, match="different modalities"):
        MomentumContrastiveObjective([("audio", "audio")], embed_dim=E)
    for key, value in (("momentum", 1.5), ("alpha", -0.1), ("queue_size", -1), ("init_temperature", 0.0)):
        cfg = MomentumContrastiveConfig(pairs=[["audio", "text"]], **{key: value})
        with pytest.raises(ObjectiveError, match=key):
            MomentumContrastiveObjective.from_config(cfg, SimpleNamespace(embed_dim=E))
    obj = MomentumContrastiveObjective([("audio", "text")], embed_dim=E, dedup_by="transcript")
    obj.bind(FakeModel())
    with pytest.raises(ObjectiveError, match="transcript"):
        obj(_student(_batch(3, 0), 0), _batch(3, 0))
    with pytest.raises(ObjectiveError, match="bind"):
        MomentumContrastiveObjective([("audio", "text")], embed_dim=E)(_student(_batch(3, 0), 0), _batch(3, 0))


# --- two real ranks against one --------------------------------------------------------------------------------
GLOBAL = 8


def _run_steps(rank: int, world: int) -> dict:
    """Two training steps of the objective on this rank's rows of fixed global batches (world 1: all rows)."""
    per = GLOBAL // world
    rows = slice(rank * per, (rank + 1) * per)
    obj, model = _objective(seed=0, queue_size=11)
    g = torch.Generator().manual_seed(4)
    prefill = F.normalize(torch.randn(6, E, generator=g), dim=-1)
    first = _batch(GLOBAL, seed=20, absent=(1, 6))
    prefill_ids = meta_ids(["p0", "p1", first.keys[5], "p3", first.keys[0], "p5"])
    for side in ("audio", "text"):
        obj.queues["audio-text"][side].enqueue(prefill, prefill_ids, gather=False)
    result: dict = {}
    for step, batch in enumerate((first, _batch(GLOBAL, seed=21, absent=(3,)))):
        out = _student(batch, seed=step)
        local = batch.rows(rows.start, rows.stop)
        emb = {m: e.detach()[rows].clone().requires_grad_(True) for m, e in out.embeddings.items()}
        res = obj(SimpleNamespace(embeddings=emb, present=dict(local.present)), local)
        obj.zero_grad()
        res.loss.backward()
        result[f"loss{step}"] = res.loss.detach()
        result[f"grads{step}"] = [emb["audio"].grad, emb["text"].grad, obj.log_logit_scale.grad.clone()]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05)
        obj.after_step(model)
    result["state"] = {k: v.clone() for k, v in obj.state_dict().items() if k.startswith("queues.")}
    return result


@pytest.mark.distributed
def test_two_ranks_equal_one_rank_loss_gradients_and_queue() -> None:
    world = 2
    ranks = spawn_ranks(_run_steps, world=world)
    single = _run_steps(0, 1)
    per = GLOBAL // world
    for step in range(2):
        losses = torch.stack([r[f"loss{step}"] for r in ranks])
        torch.testing.assert_close(losses.mean(), single[f"loss{step}"], rtol=1e-5, atol=1e-6)
        for rank, r in enumerate(ranks):
            rows = slice(rank * per, (rank + 1) * per)
            for mine, theirs in zip(r[f"grads{step}"][:2], single[f"grads{step}"][:2], strict=True):
                # each rank holds d(Σ_k L_k)/dx = world · dL/dx for its rows; DeepSpeed's averaging divides by world
                torch.testing.assert_close(mine / world, theirs[rows], rtol=1e-5, atol=1e-7)
        scale_grad = torch.stack([r[f"grads{step}"][2] for r in ranks]).mean(0)
        torch.testing.assert_close(scale_grad, single[f"grads{step}"][2], rtol=1e-5, atol=1e-6)
    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    assert int(state0["queues.audio-text.audio.filled"]) == 11  # 6 + 6 + 7 rows written: wrapped
    for key in state0:
        assert torch.equal(state0[key], state1[key]), key
        torch.testing.assert_close(state0[key], single["state"][key], rtol=1e-6, atol=1e-6)

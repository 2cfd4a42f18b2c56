"""SigLIP against open_clip's SigLipLoss (1 rank, and 2 real gloo ranks with its neighbour exchange), against a
float64 loop written from the formula, and gathered over 2 ranks against 1 rank over the concatenated batch.

Tolerances: float32 vs float32 (open_clip) rtol 1e-5 / atol 1e-6; float32 vs the float64 loop rtol 1e-5 / atol 1e-6;
gradcheck in float64 with its defaults.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from mmssl.objectives.base import ObjectiveError
from mmssl.objectives.siglip import SigLIPConfig, SigLIPObjective, siglip_loss
from tests.helpers.spawn import spawn_ranks

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _inputs(n: int, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def _grads(fn, a: torch.Tensor, b: torch.Tensor, scale: float, bias: float) -> tuple[torch.Tensor, ...]:
    """(loss, d/da, d/db, d/dscale, d/dbias) of ``fn(a, b, scale, bias)``."""
    a = a.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    t = torch.tensor(scale, dtype=a.dtype, requires_grad=True)
    beta = torch.tensor(bias, dtype=a.dtype, requires_grad=True)
    loss = fn(a, b, t, beta)
    loss.backward()
    return loss.detach(), a.grad, b.grad, t.grad, beta.grad


def _open_clip(a, b, t, beta, **kw) -> torch.Tensor:
    return SigLipLoss(**kw)(F.normalize(a, dim=-1), F.normalize(b, dim=-1), t, beta)


def _ours(a, b, t, beta, **kw) -> torch.Tensor:
    return siglip_loss(a, b, t, beta, **kw)[0]


def _loop(a, b, t, beta, valid: list[bool], pos: list[int] | None = None) -> torch.Tensor:
    """-1/N Σ_i Σ_j log σ(z_ij (t a_i·b_j + β)) over complete pairs, z_ij = +1 for j = i or a shared known id."""
    a = a.double() / a.double().norm(dim=1, keepdim=True)
    b = b.double() / b.double().norm(dim=1, keepdim=True)
    idx = [i for i in range(a.shape[0]) if valid[i]]
    total = torch.zeros((), dtype=torch.float64)
    for i in idx:
        for j in idx:
            z = 1.0 if (i == j or (pos is not None and pos[i] != -1 and pos[i] == pos[j])) else -1.0
            logit = t.double() * (a[i] * b[j]).sum() + beta.double()
            total = total - torch.log(1.0 / (1.0 + torch.exp(-z * logit)))
    return total / len(idx)


def test_matches_open_clip_value_and_gradients() -> None:
    a, b = _inputs(12)
    ours = _grads(_ours, a, b, 10.0, -10.0)
    ref = _grads(_open_clip, a, b, 10.0, -10.0)
    for mine, theirs in zip(ours, ref, strict=True):  # loss, d/da, d/db, d/dt, d/dbias
        torch.testing.assert_close(mine, theirs, **TOL)
    ours = _grads(_ours, a, b, 3.7, 1.5)  # a non-initial point, where the gradients are not dominated by negatives
    ref = _grads(_open_clip, a, b, 3.7, 1.5)
    for mine, theirs in zip(ours, ref, strict=True):
        torch.testing.assert_close(mine, theirs, **TOL)


def _case(n: int = 12) -> tuple[torch.Tensor, torch.Tensor, list[bool], list[int]]:
    a, b = _inputs(n, seed=4)
    valid = [True] * n
    valid[2] = valid[4] = False  # both on rank 0 of 2: uneven counts per rank
    pos = [0, 1, 0, -1, 2, 1, 3, 0, -1, 2, 4, 3][:n]
    return a, b, valid, pos


@pytest.mark.parametrize("grouped", [False, True])
def test_matches_a_float64_loop_with_absent_rows(grouped: bool) -> None:
    a, b, valid, pos = _case()
    kw = {"valid": torch.tensor(valid), "positive_ids": torch.tensor(pos) if grouped else None}
    ours = _grads(lambda x, y, t, c: _ours(x, y, t, c, **kw), a, b, 6.0, -2.0)
    ref = _grads(lambda x, y, t, c: _loop(x, y, t, c, valid, pos if grouped else None),
                 a.double(), b.double(), 6.0, -2.0)
    for mine, theirs in zip(ours, ref, strict=True):
        torch.testing.assert_close(mine.double(), theirs, **TOL)
    # absent rows drop out of rows and columns: the same as the loss over the complete pairs alone
    keep = torch.tensor(valid)
    sub = _ours(a[keep], b[keep], 6.0, -2.0, positive_ids=torch.tensor(pos)[keep] if grouped else None)
    torch.testing.assert_close(ours[0], sub)


def test_gradcheck_float64() -> None:
    a, b = _inputs(5, d=4, seed=7)
    valid = torch.tensor([True, True, False, True, True])
    args = (a.double().requires_grad_(), b.double().requires_grad_(),
            torch.tensor(4.0, dtype=torch.float64, requires_grad=True),
            torch.tensor(-1.0, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda x, y, t, c: _ours(x, y, t, c, valid=valid,
                                                             positive_ids=torch.tensor([0, 1, 2, 0, 3])), args)


def test_objective_parameters_config_and_present_mask() -> None:
    from mmssl.architectures.outputs import ModelOutput

    obj = SigLIPObjective.from_config(SigLIPConfig(pairs=[["audio", "text"]]))
    assert obj.log_logit_scale.shape == (1,) and obj.logit_bias.shape == (1,)
    assert float(obj.logit_scale().detach()) == pytest.approx(10.0)
    assert float(obj.logit_bias.detach()) == pytest.approx(-10.0)
    assert obj.requires.modalities == ("audio", "text")
    with torch.no_grad():
        obj.log_logit_scale.fill_(math.log(1e4))
    assert float(obj.logit_scale().detach()) == pytest.approx(100.0)  # clamped at max_logit_scale
    a, b, valid, _ = _case()
    present = {"audio": torch.tensor(valid), "text": torch.ones(12, dtype=torch.bool)}
    out = ModelOutput(embeddings={"audio": a, "text": b}, pooled={}, tokens={}, present=present)
    res = obj(out)
    keep = torch.tensor(valid)
    torch.testing.assert_close(res.loss, _ours(a[keep], b[keep], 100.0, -10.0))
    res.loss.backward()
    assert obj.logit_bias.grad is not None and obj.log_logit_scale.grad is not None
    assert SigLIPObjective.from_config(SigLIPConfig(weight=0.0, pairs=[["audio", "text"]])) is not None
    for bad, match in ((SigLIPConfig(pairs=[["audio", "audio"]]), "pair"), (SigLIPConfig(), "pair"),
                       (SigLIPConfig(pairs=[["a", "t"]], init_logit_scale=0.5), "init_logit_scale"),
                       (SigLIPConfig(pairs=[["a", "t"]], weight=-1.0), "weight"),
                       (SigLIPConfig(pairs=[["a", "t"]], positives=""), "positives")):
        with pytest.raises(ObjectiveError, match=match):
            SigLIPObjective.from_config(bad)


def _rank(rank: int, world: int) -> dict:
    rows = slice(rank * 6, (rank + 1) * 6)
    a_all, b_all = _inputs(6 * world, seed=3)
    a, b = a_all[rows], b_all[rows]
    out = {
        "ours": _grads(_ours, a, b, 5.0, -3.0),
        "open_clip": _grads(lambda x, y, t, c: _open_clip(x, y, t, c, rank=rank, world_size=world), a, b, 5.0, -3.0),
    }
    a_all, b_all, valid, pos = _case(6 * world)
    kw = {"valid": torch.tensor(valid)[rows], "positive_ids": torch.tensor(pos)[rows]}
    out["masked"] = _grads(lambda x, y, t, c: _ours(x, y, t, c, **kw), a_all[rows], b_all[rows], 5.0, -3.0)
    return out


def test_gathered_over_two_ranks_matches_open_clip_and_one_rank() -> None:
    """Per rank, ours = open_clip's SigLipLoss(rank, world_size) in value and in every gradient (both give
    d(Σ_k L_k)/db_r for the exchanged/gathered b, local gradients for a, t and β). Against one rank over the
    concatenated batch: mean over ranks of loss, d/dt, d/dβ = the 1-rank values; d/da, d/db / world = 1-rank rows."""
    world = 2
    results = spawn_ranks(_rank, world=world)
    for res in results:
        for mine, theirs in zip(res["ours"], res["open_clip"], strict=True):
            torch.testing.assert_close(mine, theirs, **TOL)
    a_all, b_all = _inputs(6 * world, seed=3)
    a_m, b_m, valid, pos = _case(6 * world)
    one_rank = {
        "ours": _grads(_ours, a_all, b_all, 5.0, -3.0),
        "masked": _grads(lambda x, y, t, c: _ours(x, y, t, c, valid=torch.tensor(valid),
                                                  positive_ids=torch.tensor(pos)), a_m, b_m, 5.0, -3.0),
        "masked_f64": _grads(lambda x, y, t, c: _loop(x, y, t, c, valid, pos), a_m.double(), b_m.double(), 5.0, -3.0),
    }
    for key, ref_key in (("ours", "ours"), ("masked", "masked"), ("masked", "masked_f64")):
        loss, ga, gb, gt, gbias = one_rank[ref_key]
        for rank, res in enumerate(results):
            _, da, db, _, _ = res[key]
            rows = slice(rank * 6, (rank + 1) * 6)
            torch.testing.assert_close(da.double() / world, ga[rows].double(), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(db.double() / world, gb[rows].double(), rtol=1e-5, atol=1e-7)
        for i, ref in ((0, loss), (3, gt), (4, gbias)):
            mean = torch.stack([res[key][i].double() for res in results]).mean()
            torch.testing.assert_close(mean, ref.double(), **TOL)

"""Intra-modal NT-Xent against a float64 loop written from the formula (no installed library has NT-Xent: open_clip,
timm, sentence-transformers and transformers were checked), gradcheck, and gathered over 2 real gloo ranks against
1 rank over the concatenated batch.

Tolerances: float32 vs the float64 loop rtol 1e-5 / atol 1e-6; gradcheck in float64 with its defaults.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmssl.architectures.outputs import ModelOutput, ModelSpec
from mmssl.objectives.base import ObjectiveError
from mmssl.objectives.intramodal import IntraModalConfig, IntraModalObjective, nt_xent_loss
from tests.helpers.spawn import spawn_ranks

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _inputs(n: int, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g)
    return z1, z1 + 0.7 * torch.randn(n, d, generator=g)  # correlated views, so the loss is not trivial


def _grads(fn, z1: torch.Tensor, z2: torch.Tensor, tau: float) -> tuple[torch.Tensor, ...]:
    z1 = z1.clone().requires_grad_(True)
    z2 = z2.clone().requires_grad_(True)
    t = torch.tensor(tau, dtype=z1.dtype, requires_grad=True)
    loss = fn(z1, z2, t)
    loss.backward()
    return loss.detach(), z1.grad, z2.grad, t.grad


def _loop(z1: torch.Tensor, z2: torch.Tensor, tau: torch.Tensor, valid: list[bool]) -> torch.Tensor:
    """1/(2N) Σ_i -log(exp(sim(z_i, z_j(i))/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ)) over the 2N views of complete
    samples; ``sim`` the cosine similarity."""
    views = [z1[i].double() for i in range(len(valid)) if valid[i]] + \
            [z2[i].double() for i in range(len(valid)) if valid[i]]
    n = len(views) // 2
    total = torch.zeros((), dtype=torch.float64)
    for i in range(2 * n):
        j = i + n if i < n else i - n
        den = torch.zeros((), dtype=torch.float64)
        for k in range(2 * n):
            if k != i:
                sim = (views[i] * views[k]).sum() / (views[i].norm() * views[k].norm())
                den = den + torch.exp(sim / tau.double())
        pos = (views[i] * views[j]).sum() / (views[i].norm() * views[j].norm())
        total = total - torch.log(torch.exp(pos / tau.double()) / den)
    return total / (2 * n)


def _valid(n: int) -> list[bool]:
    valid = [True] * n
    valid[1] = valid[4] = False  # both on rank 0 of 2: uneven counts per rank
    return valid


@pytest.mark.parametrize("masked", [False, True])
def test_matches_a_float64_loop(masked: bool) -> None:
    z1, z2 = _inputs(10)
    valid = _valid(10) if masked else [True] * 10
    ours = _grads(lambda x, y, t: nt_xent_loss(x, y, t, valid=torch.tensor(valid))[0], z1, z2, 0.1)
    ref = _grads(lambda x, y, t: _loop(x, y, t, valid), z1.double(), z2.double(), 0.1)
    for mine, theirs in zip(ours, ref, strict=True):  # loss, d/dz1, d/dz2, d/dτ
        torch.testing.assert_close(mine.double(), theirs, **TOL)
    if masked:  # absent samples drop out of anchors and columns
        keep = torch.tensor(valid)
        torch.testing.assert_close(ours[0], nt_xent_loss(z1[keep], z2[keep], 0.1)[0])


def test_gradcheck_float64() -> None:
    z1, z2 = _inputs(4, d=3, seed=2)
    args = (z1.double().requires_grad_(), z2.double().requires_grad_(),
            torch.tensor(0.5, dtype=torch.float64, requires_grad=True))
    valid = torch.tensor([True, False, True, True])
    assert torch.autograd.gradcheck(lambda x, y, t: nt_xent_loss(x, y, t, valid=valid)[0], args)


def _spec() -> ModelSpec:
    return ModelSpec(family="fusion_free", modalities=("audio", "text"), embed_dim=8,
                     feature_dims={"audio": 12, "text": 10}, token_dims={"audio": 12, "text": 10})


def _outputs(n: int = 8) -> ModelOutput:
    g = torch.Generator().manual_seed(5)
    pooled = {k: torch.randn(n, 12, generator=g) for k in ("audio", "audio@1")}
    emb = {k: torch.randn(n, 8, generator=g) for k in ("audio", "audio@1", "text")}
    present = {"audio": torch.ones(n, dtype=torch.bool), "text": torch.ones(n, dtype=torch.bool),
               "audio@1": torch.tensor([True] * (n - 2) + [False] * 2)}
    return ModelOutput(embeddings=emb, pooled=pooled, tokens={}, present=present)


def test_objective_projector_views_and_config() -> None:
    obj = IntraModalObjective.from_config(IntraModalConfig(modalities=["audio"], proj_dim=6, hidden_dim=20), _spec())
    assert obj.requires.modalities == ("audio", "audio@1")
    obj.check(_spec(), "objectives.intramodal")
    with pytest.raises(ObjectiveError, match="'audio'"):
        obj.check(["text"], "objectives.intramodal")
    lin1, lin2 = obj.projectors["audio"][0], obj.projectors["audio"][2]
    assert (lin1.in_features, lin1.out_features, lin2.out_features) == (12, 20, 6)
    out = _outputs()
    res = obj(out)
    valid = out.present["audio"] & out.present["audio@1"]
    proj = obj.projectors["audio"]
    ref = nt_xent_loss(proj(out.pooled["audio"]), proj(out.pooled["audio@1"]), 0.1, valid=valid)[0]
    torch.testing.assert_close(res.loss, ref)
    res.loss.backward()
    assert lin1.weight.grad is not None and obj.log_inv_temperature.grad is None  # τ fixed by default
    assert float(obj.temperature().detach()) == pytest.approx(0.1)

    obj = IntraModalObjective.from_config(IntraModalConfig(modalities=["audio"], projector="none",
                                                           learn_temperature=True, temperature=0.2), _spec())
    assert len(obj.projectors) == 0 and obj.log_inv_temperature.requires_grad
    res = obj(out)
    ref = nt_xent_loss(out.embeddings["audio"], out.embeddings["audio@1"], 0.2, valid=valid)[0]
    torch.testing.assert_close(res.loss, ref)
    res.loss.backward()
    assert obj.log_inv_temperature.grad is not None
    with pytest.raises(ObjectiveError, match=r"data\.views"):
        IntraModalObjective(["text"], projector="none")(out)
    assert IntraModalObjective.from_config(IntraModalConfig(weight=0.0, modalities=["audio"]), _spec()) is not None
    for cfg, spec, match in ((IntraModalConfig(), _spec(), "modalities"),
                             (IntraModalConfig(modalities=["audio@1"]), _spec(), "modalities"),
                             (IntraModalConfig(modalities=["audio"], projector="bn"), _spec(), "projector"),
                             (IntraModalConfig(modalities=["audio"]), None, "feature_dims"),
                             (IntraModalConfig(modalities=["video"]), _spec(), "video"),
                             (IntraModalConfig(modalities=["audio"], temperature=0.0), _spec(), "temperature"),
                             (IntraModalConfig(modalities=["audio"], temperature=0.001), _spec(), "max_logit_scale"),
                             (IntraModalConfig(modalities=["audio"], weight=-1.0), _spec(), "weight")):
        with pytest.raises(ObjectiveError, match=match):
            IntraModalObjective.from_config(cfg, spec)


def test_learnable_temperature_is_clamped() -> None:
    obj = IntraModalObjective(["audio"], projector="none", learn_temperature=True, max_logit_scale=50.0)
    with torch.no_grad():
        obj.log_inv_temperature.fill_(math.log(1e3))
    assert float(obj.temperature().detach()) == pytest.approx(1 / 50.0)


def _rank(rank: int, world: int) -> dict:
    rows = slice(rank * 5, (rank + 1) * 5)
    z1, z2 = _inputs(5 * world, seed=3)
    valid = torch.tensor(_valid(5 * world))
    return {
        "plain": _grads(lambda x, y, t: nt_xent_loss(x, y, t)[0], z1[rows], z2[rows], 0.1),
        "masked": _grads(lambda x, y, t: nt_xent_loss(x, y, t, valid=valid[rows])[0], z1[rows], z2[rows], 0.1),
    }


def test_gathered_over_two_ranks_matches_one_rank() -> None:
    """Mean over ranks of the loss and of d/dτ = the 1-rank values over the concatenated batch (and the float64
    loop); each rank's d/dz1, d/dz2 (summed over ranks by gather_with_grad) / world = the 1-rank rows."""
    world = 2
    results = spawn_ranks(_rank, world=world)
    z1, z2 = _inputs(5 * world, seed=3)
    valid = _valid(5 * world)
    one_rank = {
        "plain": _grads(lambda x, y, t: nt_xent_loss(x, y, t)[0], z1, z2, 0.1),
        "masked": _grads(lambda x, y, t: nt_xent_loss(x, y, t, valid=torch.tensor(valid))[0], z1, z2, 0.1),
        "loop": _grads(lambda x, y, t: _loop(x, y, t, valid), z1.double(), z2.double(), 0.1),
    }
    for key, ref_key in (("plain", "plain"), ("masked", "masked"), ("masked", "loop")):
        loss, g1, g2, gt = one_rank[ref_key]
        for rank, res in enumerate(results):
            rows = slice(rank * 5, (rank + 1) * 5)
            torch.testing.assert_close(res[key][1].double() / world, g1[rows].double(), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(res[key][2].double() / world, g2[rows].double(), rtol=1e-5, atol=1e-7)
        for i, ref in ((0, loss), (3, gt)):
            mean = torch.stack([res[key][i].double() for res in results]).mean()
            torch.testing.assert_close(mean, ref.double(), **TOL)


def test_slip_projector_has_three_layers_with_batch_norm() -> None:
    """SLIP's image MLP (768 -> 4096 -> 4096 -> 256, BatchNorm + ReLU after each hidden layer): the module order and
    its parameter count written out."""
    from torch import nn

    from mmssl.objectives.intramodal import mlp_projector

    head = mlp_projector(768, 4096, 256, layers=3, batch_norm=True)
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert sum(p.numel() for p in head.parameters()) == (768 * 4096 + 4096) + 2 * 4096 + (4096 * 4096 + 4096) \
        + 2 * 4096 + (4096 * 256 + 256)
    assert [type(m) for m in mlp_projector(8, 16, 4)] == [nn.Linear, nn.ReLU, nn.Linear]  # SimCLR's default

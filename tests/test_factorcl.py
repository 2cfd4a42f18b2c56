"""FactorCL: the NCE / NCE-CLUB estimators and the assembled loss against float64 loop re-implementations, the
stop-gradient routing of the CLUB critics, configuration errors, and short trainings on synthetic data with known
shared and unique factors."""

from __future__ import annotations

import math
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmssl.architectures.outputs import ModelSpec
from mmssl.objectives.base import ObjectiveError
from mmssl.objectives.factorcl import (
    CLUB_BOUNDS,
    NCE_BOUNDS,
    FactorCLConfig,
    FactorCLObjective,
    factorcl_loss,
    info_nce,
    label_ids,
    nce_club,
)

# ---------------------------------------------------------------- plain float64 references (loops over rows/pairs)


def ref_info_nce(s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    n = s.shape[0]
    total = s.new_zeros(())
    for i in range(n):
        cols = [j for j in range(n) if mask is None or bool(mask[i, j]) or j == i]
        denom = sum(torch.exp(s[i, j]) for j in cols) / len(cols)
        total = total + s[i, i] - torch.log(denom)
    return total / n


def ref_nce_club(s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    n = s.shape[0]
    per_row = []
    for i in range(n):
        negs = [s[i, j] for j in range(n) if j != i and (mask is None or bool(mask[i, j]))]
        if negs:
            per_row.append(s[i, i] - sum(negs) / len(negs))
    return sum(per_row) / len(per_row)


def ref_mlp(mlp: torch.nn.Module, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
    w0, b0, w1, b1 = (p.detach() if frozen else p for p in (mlp.w0, mlp.b0, mlp.w1, mlp.b1))
    return w1 @ torch.relu(w0 @ x + b0) + b1


def ref_scores(critic: torch.nn.Module, a: list[torch.Tensor], b: list[torch.Tensor], frozen: bool = False):
    ga = [F.normalize(ref_mlp(critic.g, x, frozen), dim=0) for x in a]
    hb = [F.normalize(ref_mlp(critic.h, y, frozen), dim=0) for y in b]
    return torch.stack([torch.stack([torch.dot(gi, hj) / critic.temperature for hj in hb]) for gi in ga])


def ref_objective(obj: FactorCLObjective, feats: dict, valid: torch.Tensor, labels: list[int] | None = None):
    """Independent assembly of S, U1, U2 (eqs. 4.8-4.9) and of the CLUB critics' fit term, from the module's
    parameters only."""
    rows = [i for i in range(valid.shape[0]) if bool(valid[i])]
    x1 = [feats[obj.m1][i] for i in rows]
    x2 = [feats[obj.m2][i] for i in rows]
    zs1 = [ref_mlp(obj.head_s1, x) for x in x1]
    zs2 = [ref_mlp(obj.head_s2, x) for x in x2]
    zu1 = [ref_mlp(obj.head_u1, x) for x in x1]
    zu2 = [ref_mlp(obj.head_u2, x) for x in x2]
    mask = None
    if labels is None:
        v1 = [feats[f"{obj.m1}@1"][i] for i in rows]
        v2 = [feats[f"{obj.m2}@1"][i] for i in rows]
        y1 = [ref_mlp(obj.head_u1, v) for v in v1]
        y2 = [ref_mlp(obj.head_u2, v) for v in v2]
        cs1 = [torch.cat([z, ref_mlp(obj.head_s1, v)]) for z, v in zip(zs1, v1, strict=True)]
        cs2 = [torch.cat([z, ref_mlp(obj.head_s2, v)]) for z, v in zip(zs2, v2, strict=True)]
        cu1 = [torch.cat([z, y]) for z, y in zip(zu1, y1, strict=True)]
        cu2 = [torch.cat([z, y]) for z, y in zip(zu2, y2, strict=True)]
    else:
        ys = [labels[i] for i in rows]
        eye = torch.eye(obj.num_labels, dtype=torch.float64)
        y1 = y2 = [eye[y] for y in ys]
        cs1 = [torch.cat([z, o]) for z, o in zip(zs1, y1, strict=True)]
        cs2 = [torch.cat([z, o]) for z, o in zip(zs2, y1, strict=True)]
        cu1 = [torch.cat([z, o]) for z, o in zip(zu1, y1, strict=True)]
        cu2 = [torch.cat([z, o]) for z, o in zip(zu2, y1, strict=True)]
        if obj.conditional_negatives == "same_label":
            mask = torch.tensor([[a == b for b in ys] for a in ys])
    c = obj.critics
    b = {
        "nce_x1x2": ref_info_nce(ref_scores(c["nce_x1x2"], zs1, zs2)),
        "nce_x1y": ref_info_nce(ref_scores(c["nce_x1y"], zu1, y1)),
        "nce_x2y": ref_info_nce(ref_scores(c["nce_x2y"], zu2, y2)),
        "nce_x1x2_cond": ref_info_nce(ref_scores(c["nce_x1x2_cond"], cu1, cu2), mask),
        "club_x1x2": ref_nce_club(ref_scores(c["club_x1x2"], zu1, zu2, frozen=True)),
        "club_x1x2_cond": ref_nce_club(ref_scores(c["club_x1x2_cond"], cs1, cs2, frozen=True), mask),
    }
    s = b["nce_x1x2"] - b["club_x1x2_cond"]
    u1 = b["nce_x1y"] - b["club_x1x2"] + b["nce_x1x2_cond"]
    u2 = b["nce_x2y"] - b["club_x1x2"] + b["nce_x1x2_cond"]
    det = [[t.detach() for t in side] for side in (zu1, zu2, cs1, cs2)]
    fit = -ref_info_nce(ref_scores(c["club_x1x2"], det[0], det[1])) - ref_info_nce(
        ref_scores(c["club_x1x2_cond"], det[2], det[3]), mask)
    return -(s + u1 + u2), {"S": s, "U1": u1, "U2": u2, **b}, fit


# ---------------------------------------------------------------- fixtures


def _outputs(feats: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> SimpleNamespace:
    return SimpleNamespace(pooled=feats, embeddings=feats, present=present)


def _ssl_case(n: int = 6, d1: int = 5, d2: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    obj = FactorCLObjective(["audio", "text"], {"audio": d1, "text": d2}, hidden_dim=7, proj_dim=4,
                            temperature=0.5).double()
    feats = {m: torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
             for m, d in (("audio", d1), ("text", d2), ("audio@1", d1), ("text@1", d2))}
    present = {m: torch.ones(n, dtype=torch.bool) for m in feats}
    present["text"][1] = False
    present["audio@1"][4] = False
    return obj, feats, present


def _grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads, strict=True)]


# ---------------------------------------------------------------- estimators


@pytest.mark.parametrize("masked", [False, True])
def test_info_nce_and_nce_club_match_loops_in_float64(masked: bool) -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(7, 7, generator=g, dtype=torch.float64) * 3
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    mask = labels[:, None] == labels[None, :] if masked else None
    torch.testing.assert_close(info_nce(s, mask), ref_info_nce(s, mask), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nce_club(s, mask), ref_nce_club(s, mask), rtol=1e-12, atol=1e-12)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: info_nce(x, mask), (s,))
    assert torch.autograd.gradcheck(lambda x: nce_club(x, mask), (s,))


def test_info_nce_is_at_most_log_n_for_any_critic() -> None:
    g = torch.Generator().manual_seed(2)
    for n in (2, 5, 16):
        for scale in (0.1, 1.0, 10.0, 1e3):
            s = torch.randn(n, n, generator=g, dtype=torch.float64) * scale
            assert float(info_nce(s)) <= math.log(n) + 1e-12
        # a critic that separates positives perfectly approaches log N from below
        perfect = torch.eye(n, dtype=torch.float64) * 50
        assert math.log(n) - 1e-9 < float(info_nce(perfect)) <= math.log(n)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    mask = labels[:, None] == labels[None, :]
    bound = torch.log(mask.sum(1).double()).mean()  # per-row log |M_i|
    assert float(info_nce(torch.eye(6, dtype=torch.float64) * 50, mask)) == pytest.approx(float(bound), abs=1e-9)
    assert float(info_nce(torch.randn(6, 6, generator=g, dtype=torch.float64) * 9, mask)) <= float(bound) + 1e-12


def test_pure_loss_assembles_s_u1_u2() -> None:
    g = torch.Generator().manual_seed(3)
    scores = {k: torch.randn(5, 5, generator=g, dtype=torch.float64) for k in NCE_BOUNDS + CLUB_BOUNDS}
    loss, terms = factorcl_loss(scores)
    b = {k: ref_info_nce(scores[k]) for k in NCE_BOUNDS} | {k: ref_nce_club(scores[k]) for k in CLUB_BOUNDS}
    s = b["nce_x1x2"] - b["club_x1x2_cond"]
    u = [b[k] - b["club_x1x2"] + b["nce_x1x2_cond"] for k in ("nce_x1y", "nce_x2y")]
    torch.testing.assert_close(loss, -(s + u[0] + u[1]), rtol=1e-12, atol=1e-12)
    for name, value in {"S": s, "U1": u[0], "U2": u[1], **b}.items():
        torch.testing.assert_close(terms[name], value, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the objective vs an independent assembly


def test_ssl_objective_matches_reference_value_terms_and_gradients() -> None:
    obj, feats, present = _ssl_case()
    out = obj(_outputs(feats, present))
    valid = present["audio"] & present["text"] & present["audio@1"] & present["text@1"]
    ref_loss, ref_terms, ref_fit = ref_objective(obj, feats, valid)
    # the value is exactly -(S + U1 + U2); the CLUB critics' fit term adds gradient only
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-10, atol=1e-10)
    for name, value in ref_terms.items():
        torch.testing.assert_close(out.terms[name], value.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.terms["club_fit"], ref_fit.detach(), rtol=1e-10, atol=1e-10)
    assert float(out.metrics["rows"]) == int(valid.sum()) == 4
    leaves = list(feats.values()) + list(obj.parameters())
    for mine, theirs in zip(_grads(out.loss, leaves), _grads(ref_loss + ref_fit, leaves), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-11)
    # absent rows get no gradient
    g_audio, g_text = _grads(out.loss, [feats["audio"], feats["text"]])
    assert float(g_audio[[1, 4]].abs().sum()) == 0.0 and float(g_text[[1, 4]].abs().sum()) == 0.0
    assert float(g_audio[[0, 2, 3, 5]].abs().sum(1).min()) > 0.0


@pytest.mark.parametrize("negatives", ["same_label", "batch"])
def test_supervised_objective_matches_reference_with_string_labels(negatives: str) -> None:
    g = torch.Generator().manual_seed(4)
    n = 8
    obj = FactorCLObjective(["audio", "text"], {"audio": 5, "text": 3}, variant="supervised", label="family",
                            num_labels=16, hidden_dim=6, proj_dim=3, temperature=0.3,
                            conditional_negatives=negatives).double()
    feats = {m: torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
             for m, d in (("audio", 5), ("text", 3))}
    present = {m: torch.ones(n, dtype=torch.bool) for m in feats}
    family = ["digits", "yesno", "digits", None, "names", "yesno", "digits", "names"]
    out = obj(_outputs(feats, present), SimpleNamespace(meta={"family": family}))
    ids = [zlib.crc32(f.encode()) % 16 if f else 0 for f in family]
    valid = torch.tensor([f is not None for f in family])
    ref_loss, ref_terms, ref_fit = ref_objective(obj, feats, valid, labels=ids)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-10, atol=1e-10)
    for name, value in ref_terms.items():
        torch.testing.assert_close(out.terms[name], value.detach(), rtol=1e-10, atol=1e-10)
    leaves = list(feats.values()) + list(obj.parameters())
    for mine, theirs in zip(_grads(out.loss, leaves), _grads(ref_loss + ref_fit, leaves), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-11)


def test_club_critics_learn_only_from_their_fit_and_encoders_only_from_the_bounds() -> None:
    obj, feats, present = _ssl_case(seed=5)
    outputs = _outputs(feats, present)
    scores, fit, _, _ = obj.score_matrices(outputs)
    bounds_only, _ = factorcl_loss(scores)  # -(S+U1+U2) with the CLUB critics frozen
    fit_only = sum(-info_nce(fit[k]) for k in CLUB_BOUNDS)
    club = [p for k in CLUB_BOUNDS for p in obj.critics[k].parameters()]
    nce = [p for k in NCE_BOUNDS for p in obj.critics[k].parameters()]
    heads = [p for h in (obj.head_s1, obj.head_s2, obj.head_u1, obj.head_u2) for p in h.parameters()]
    inputs = list(feats.values())
    # the bounds move encoders (features), heads and NCE critics, never the CLUB critics
    assert all(float(gr.abs().sum()) == 0 for gr in _grads(bounds_only, club))
    assert all(float(gr.abs().sum()) > 0 for gr in _grads(bounds_only, nce + heads))
    assert all(float(gr.abs().sum()) > 0 for gr in _grads(bounds_only, inputs))
    # the fit moves the CLUB critics only
    assert all(float(gr.abs().sum()) == 0 for gr in _grads(fit_only, inputs + nce + heads))
    assert all(float(gr.abs().sum()) > 0 for gr in _grads(fit_only, club))
    # and the objective's loss carries exactly both
    total = obj(outputs).loss
    both = [a + b for a, b in zip(_grads(bounds_only, inputs + heads + nce + club),
                                  _grads(fit_only, inputs + heads + nce + club), strict=True)]
    for mine, theirs in zip(_grads(total, inputs + heads + nce + club), both, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


def test_fewer_than_two_rows_give_a_zero_that_reaches_every_parameter() -> None:
    obj, feats, present = _ssl_case()
    present = {m: torch.zeros_like(p) for m, p in present.items()}
    present["audio"][0] = present["text"][0] = present["audio@1"][0] = present["text@1"][0] = True
    out = obj(_outputs(feats, present))
    assert float(out.loss.detach()) == 0.0 and out.terms == {}
    out.loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0 for p in obj.parameters())


def test_bf16_features_give_a_finite_float32_loss() -> None:
    obj, feats, present = _ssl_case()
    obj = obj.to(torch.bfloat16)
    out = obj(_outputs({m: f.detach().bfloat16() for m, f in feats.items()}, present))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


# ---------------------------------------------------------------- configuration


def _spec() -> ModelSpec:
    return ModelSpec(family="fusion_free", modalities=("audio", "text"), embed_dim=16,
                     feature_dims={"audio": 24, "text": 12}, token_dims={"audio": 24, "text": 12})


def test_from_config_sizes_heads_and_declares_views() -> None:
    obj = FactorCLObjective.from_config(FactorCLConfig(modalities=["audio", "text"], hidden_dim=8, proj_dim=4), _spec())
    assert obj.head_s1.w0.shape == (8, 24) and obj.head_u2.w0.shape == (8, 12)
    assert obj.requires.modalities == ("audio", "text", "audio@1", "text@1")
    assert obj.requires.gathers_across_ranks is False
    obj.check(_spec(), where="objectives.factorcl")
    sup = FactorCLObjective.from_config(FactorCLConfig(modalities=["audio", "text"], variant="supervised",
                                                       label="family", feature="embeddings"), _spec())
    assert sup.requires.modalities == ("audio", "text") and sup.head_s1.w0.shape[1] == 16
    assert sup.conditional_negatives == "same_label"


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"modalities": ["audio"]}, "modalities"),
        ({"modalities": ["audio", "audio"]}, "modalities"),
        ({"modalities": ["audio", "video"]}, "'video'"),
        ({"variant": "sup"}, "variant"),
        ({"variant": "supervised"}, "label"),
        ({"label": "family"}, "label"),
        ({"feature": "tokens"}, "feature"),
        ({"temperature": 0.0}, "temperature"),
        ({"proj_dim": 0}, "proj_dim"),
        ({"variant": "supervised", "label": "family", "num_labels": 1}, "num_labels"),
        ({"conditional_negatives": "same_label"}, "conditional_negatives"),
        ({"conditional_negatives": "knn"}, "conditional_negatives"),
    ],
)
def test_bad_configuration_names_the_field(changes: dict, needle: str) -> None:
    cfg = FactorCLConfig(**{"modalities": ["audio", "text"], **changes})
    with pytest.raises(ObjectiveError, match=needle):
        FactorCLObjective.from_config(cfg, _spec())


def test_label_ids_are_stable_and_missing_labels_drop_rows() -> None:
    ids, ok = label_ids(["digits", np.int64(5), None, "digits", 21, 3.0], 16)
    assert ids[0] == ids[3] == zlib.crc32(b"digits") % 16
    assert ids[1] == 5 and ids[4] == 5 and ids[5] == 3 and ok == [True, True, False, True, True, True]
    obj = FactorCLObjective(["audio", "text"], {"audio": 4, "text": 4}, variant="supervised", label="family")
    feats = {m: torch.randn(3, 4) for m in ("audio", "text")}
    present = {m: torch.ones(3, dtype=torch.bool) for m in feats}
    with pytest.raises(ObjectiveError, match=r"'family' is not a batch\.meta field"):
        obj(_outputs(feats, present), SimpleNamespace(meta={"text": ["a", "b", "c"]}))


# ---------------------------------------------------------------- synthetic factors: training raises the estimates

K, D, SIGMA, BATCH = 4, 4, 0.3, 64


def _synthetic(seed: int, k: int):
    """x1 = [E_s1(s), E_u1(u1), 0] + noise, x2 = [E_s2(s), E_u2(u2), 0] + noise with s, u1, u2 uniform over k
    values; a view redraws the noise (keeps s and u_i: an optimal augmentation)."""
    emb = [torch.randn(k, D, generator=torch.Generator().manual_seed(seed + 10 + i)) for i in range(4)]
    g = torch.Generator().manual_seed(seed)

    def draw(n: int):
        s, u1, u2 = (torch.randint(0, k, (n,), generator=g) for _ in range(3))

        def x(e_s, e_u, u):
            return torch.cat([e_s[s], e_u[u], torch.zeros(n, D)], 1) + SIGMA * torch.randn(n, 3 * D, generator=g)

        feats = {"a": x(emb[0], emb[2], u1), "b": x(emb[1], emb[3], u2),
                 "a@1": x(emb[0], emb[2], u1), "b@1": x(emb[1], emb[3], u2)}
        present = {m: torch.ones(n, dtype=torch.bool) for m in feats}
        return _outputs(feats, present), SimpleNamespace(meta={"y": (s * k + u1).tolist()})

    return draw


def _train(obj: FactorCLObjective, draw, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Adam on the objective's heads and critics (identity encoders); mean terms over the first 10 and the last 50
    steps' batches. One thread: tiny matrices, and deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.Adam(obj.parameters(), lr=3e-3)
        history = []
        for _ in range(steps):
            out = obj(*draw(BATCH))
            history.append({k: float(v) for k, v in out.terms.items()})
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)

    def mean(rows):
        return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}

    return mean(history[:10]), mean(history[-50:])


def test_supervised_training_raises_s_and_u1_on_known_factors() -> None:
    """Label y = (s, u1): S = I(X1;X2;Y) = log K, U1 = I(X1;Y|X2) = log K, U2 = 0 (K = 4, log K = 1.386)."""
    torch.manual_seed(0)
    obj = FactorCLObjective(["a", "b"], {"a": 3 * D, "b": 3 * D}, variant="supervised", label="y",
                            num_labels=K * K, hidden_dim=64, proj_dim=32, temperature=0.1)
    first, last = _train(obj, _synthetic(1, K), steps=200)
    assert last["S"] > first["S"] + 0.5, (first, last)
    assert last["S"] > 1.0, last  # the shared factor is found (ceiling log K = 1.386)
    assert last["U1"] > first["U1"] + 1.0, (first, last)
    assert last["U1"] > last["U2"] + 0.5, last  # the label's unique part is in X1, not X2


def test_ssl_training_raises_the_unique_estimates() -> None:
    """Self-supervised: the views carry s and u_i. U1 and U2 grow; S itself is held near 0 by the batch-negative
    conditional CLUB term (see the module docstring), which stays positive."""
    torch.manual_seed(0)
    obj = FactorCLObjective(["a", "b"], {"a": 3 * D, "b": 3 * D}, hidden_dim=64, proj_dim=32, temperature=0.1)
    first, last = _train(obj, _synthetic(2, 2 * K), steps=200)
    assert last["U1"] > first["U1"] + 1.0 and last["U2"] > first["U2"] + 1.0, (first, last)
    assert last["nce_x1y"] > 2.0 and last["nce_x2y"] > 2.0, last  # I(X_i; X_i') holds s and u_i
    assert last["club_x1x2_cond"] > 0.0, last

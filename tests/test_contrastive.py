"""The contrastive loss against open_clip's ClipLoss, on one rank and gathered over two real gloo ranks; its MIL-NCE
(``positive_ids``) and duplicate-exclusion (``duplicate_ids``) options against a float64 loop and 2 ranks vs 1.

Tolerances: float32 vs open_clip / the float64 loop rtol 1e-5, atol 1e-6; per-row gradients rtol 1e-5, atol 1e-7."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from mmssl.objectives.contrastive import ContrastiveObjective, contrastive_loss
from tests.helpers.spawn import spawn_ranks


def _inputs(n: int, d: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def _grads(fn, a: torch.Tensor, b: torch.Tensor, scale: float):
    a = a.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    s = torch.tensor(scale, requires_grad=True)
    loss = fn(a, b, s)
    loss.backward()
    return loss.detach(), a.grad, b.grad, s.grad


def _open_clip(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, **kw) -> torch.Tensor:
    return ClipLoss(**kw)(F.normalize(a, dim=-1), F.normalize(b, dim=-1), s)


def test_matches_open_clip_value_and_gradients() -> None:
    a, b = _inputs(16)
    ours = _grads(lambda x, y, s: contrastive_loss(x, y, s)[0], a, b, 14.3)
    ref = _grads(_open_clip, a, b, 14.3)
    for mine, theirs in zip(ours, ref, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_absent_rows_are_left_out_of_rows_and_negatives() -> None:
    a, b = _inputs(12)
    valid = torch.tensor([True] * 9 + [False] * 3)
    valid = valid[torch.randperm(12, generator=torch.Generator().manual_seed(1))]
    loss, _ = contrastive_loss(a, b, torch.tensor(10.0), valid=valid)
    ref = _open_clip(a[valid], b[valid], torch.tensor(10.0))
    torch.testing.assert_close(loss, ref)


def test_objective_clamps_the_learnable_scale() -> None:
    obj = ContrastiveObjective([("audio", "text")], init_temperature=0.001, max_logit_scale=100.0)
    assert float(obj.logit_scale().detach()) == pytest.approx(100.0)
    obj = ContrastiveObjective([("audio", "text")], init_temperature=0.07)
    assert float(obj.logit_scale().detach()) == pytest.approx(1 / 0.07)


def _rank_main(rank: int, world: int) -> dict:
    """Everything the 2-rank tests compare, computed in one spawn (run by `spawn_ranks` on a gloo rank)."""
    a_all, b_all = _inputs(8 * world, seed=3)
    a, b = a_all[rank * 8 : (rank + 1) * 8], b_all[rank * 8 : (rank + 1) * 8]
    ours = _grads(lambda x, y, s: contrastive_loss(x, y, s)[0], a, b, 20.0)
    ref = _grads(lambda x, y, s: _open_clip(x, y, s, local_loss=True, gather_with_grad=True, rank=rank,
                                            world_size=world), a, b, 20.0)
    return {"ours": ours, "ref": ref, "grouped": _grouped_rank(rank, world)}


def _assert_ranks_equal_global(per_rank: list, global_: tuple, rows_per_rank: int) -> None:
    """Per-rank ``(loss, d/da, d/db, d/dscale)`` against the 1-rank values over the concatenated batch: the mean
    over ranks of the loss and of d/dscale equal the global ones; each rank's gradient is
    d(Σ_k L_k)/dx = world · dL/dx (DeepSpeed's averaging divides by world), so d/da / world equals its rows."""
    world = len(per_rank)
    global_loss, ga, gb, gs = global_
    for rank, (_, da, db, _) in enumerate(per_rank):
        rows = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
        torch.testing.assert_close(da / world, ga[rows], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(db / world, gb[rows], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.stack([r[0] for r in per_rank]).mean(), global_loss)
    torch.testing.assert_close(torch.stack([r[3] for r in per_rank]).mean(), gs)


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return spawn_ranks(_rank_main, world=2)


def test_gathered_over_two_ranks_matches_open_clip_and_the_global_loss(two_ranks: list[dict]) -> None:
    world = 2
    a_all, b_all = _inputs(8 * world, seed=3)
    global_loss, ga, gb, gs = _grads(lambda x, y, s: contrastive_loss(x, y, s)[0], a_all, b_all, 20.0)
    for res in two_ranks:
        for mine, theirs in zip(res["ours"], res["ref"], strict=True):  # loss, d/da, d/db, d/dscale
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    _assert_ranks_equal_global([res["ours"] for res in two_ranks], (global_loss, ga, gb, gs), rows_per_rank=8)


# --- MIL-NCE multiple positives and duplicate exclusion --------------------------------------------------------------

def _loop_reference(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, valid: list[bool], pos: list[int] | None,
                    dup: list[int] | None) -> torch.Tensor:
    """float64, written from the formula: each direction's row term is -log(Σ_{j∈P(i)} e^{s x_i·y_j} / Σ_{j∈D(i)}
    e^{s x_i·y_j}), P(i) = {i} ∪ {j: pos_j = pos_i ≠ -1}, D(i) = valid columns minus {j ∉ P(i): dup_j = dup_i ≠ -1};
    the loss is the sum over valid rows and both directions / (2 · #valid)."""
    a = a.double() / a.double().norm(dim=1, keepdim=True)
    b = b.double() / b.double().norm(dim=1, keepdim=True)
    rows = [i for i in range(a.shape[0]) if valid[i]]
    total = torch.zeros((), dtype=torch.float64)
    for x, y in ((a, b), (b, a)):
        for i in rows:
            num = torch.zeros((), dtype=torch.float64)
            den = torch.zeros((), dtype=torch.float64)
            for j in rows:
                e = torch.exp(s * (x[i] * y[j]).sum())
                is_pos = j == i or (pos is not None and pos[i] != -1 and pos[i] == pos[j])
                is_dup = dup is not None and dup[i] != -1 and dup[i] == dup[j]
                if is_pos:
                    num = num + e
                if is_pos or not is_dup:
                    den = den + e
            total = total - torch.log(num / den)
    return total / (2 * len(rows))


def _grouped_case(n: int = 12) -> tuple[torch.Tensor, torch.Tensor, list[bool], list[int], list[int]]:
    a, b = _inputs(n, seed=5)
    valid = [True] * n
    valid[3] = valid[5] = False  # both on rank 0 of 2: uneven counts per rank
    pos = [0, 1, 0, 2, -1, 1, 3, 0, -1, 4, 2, 3][:n]  # groups that span both halves; -1: unknown
    dup = [7, 7, 8, 9, 9, 8, 5, -1, 7, 6, 6, -1][:n]
    return a, b, valid, pos, dup


@pytest.mark.parametrize("which", ["positives", "duplicates", "both"])
def test_grouped_options_match_a_float64_loop(which: str) -> None:
    a, b, valid, pos, dup = _grouped_case()
    pos_l = pos if which in ("positives", "both") else None
    dup_l = dup if which in ("duplicates", "both") else None
    kw = {"positive_ids": None if pos_l is None else torch.tensor(pos_l),
          "duplicate_ids": None if dup_l is None else torch.tensor(dup_l)}
    ours = _grads(lambda x, y, s: contrastive_loss(x, y, s, valid=torch.tensor(valid), **kw)[0], a, b, 9.0)
    ref = _grads(lambda x, y, s: _loop_reference(x, y, s.double(), valid, pos_l, dup_l), a.double(), b.double(), 9.0)
    for mine, theirs in zip(ours, ref, strict=True):  # float32 vs float64
        torch.testing.assert_close(mine.double(), theirs.double(), rtol=1e-5, atol=1e-6)


def test_grouped_path_with_singleton_groups_equals_the_plain_loss() -> None:
    a, b = _inputs(10, seed=2)
    valid = torch.tensor([True] * 8 + [False] * 2)
    plain, plain_m = contrastive_loss(a, b, 12.0, valid=valid)
    for ids in (torch.arange(10) * 7 + 3, torch.full((10,), -1)):
        grouped, grouped_m = contrastive_loss(a, b, 12.0, valid=valid, positive_ids=ids, duplicate_ids=ids)
        torch.testing.assert_close(grouped, plain, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grouped_m["acc_ab"], plain_m["acc_ab"])
    # positives and duplicates on the same field: duplicates that are positives stay, so it is plain MIL-NCE
    ids = torch.tensor([0, 1, 0, 2, 1, 3, 3, 0, 4, 5])
    both, _ = contrastive_loss(a, b, 12.0, valid=valid, positive_ids=ids, duplicate_ids=ids)
    torch.testing.assert_close(both, contrastive_loss(a, b, 12.0, valid=valid, positive_ids=ids)[0])


def test_meta_ids_are_a_stable_hash() -> None:
    import hashlib

    from mmssl.objectives.ids import meta_ids

    expected = int.from_bytes(hashlib.blake2b(b"press one", digest_size=8).digest(), "little") & (2**63 - 1)
    ids = meta_ids(["press one", "goodbye", "press one", None, 3])
    assert ids.dtype == torch.int64
    assert ids[0] == expected and ids[2] == expected and ids[1] != expected
    assert ids[3] == -1 and ids[4] >= 0


def test_objective_reads_meta_fields() -> None:
    from mmssl.architectures.outputs import ModelOutput
    from mmssl.data_pipelines.batch import Batch
    from mmssl.objectives.base import ObjectiveError
    from mmssl.objectives.ids import meta_ids

    a, b, valid, _, _ = _grouped_case()
    texts = ["hi", "bye", "hi", "x", None, "bye", "y", "hi", None, "z", "x", "y"]
    families = ["f1", "f1", "f2", "f2", "f1", "f3", "f3", "f1", "f2", "f3", "f1", "f2"]
    present = {"audio": torch.tensor(valid), "text": torch.ones(12, dtype=torch.bool)}
    out = ModelOutput(embeddings={"audio": a, "text": b}, pooled={}, tokens={}, present=present)
    batch = Batch(inputs={}, present=present, keys=[str(i) for i in range(12)], meta={"text": texts,
                                                                                    "family": families})
    obj = ContrastiveObjective([("audio", "text")], init_temperature=0.1, positives="text",
                               exclude_duplicates="family")
    got = obj(out, batch).loss
    ref = contrastive_loss(a, b, obj.logit_scale(), valid=torch.tensor(valid), positive_ids=meta_ids(texts),
                           duplicate_ids=meta_ids(families))[0]
    torch.testing.assert_close(got, ref)
    with pytest.raises(ObjectiveError, match="positives='transcript'"):
        ContrastiveObjective([("audio", "text")], positives="transcript")(out, batch)
    with pytest.raises(ObjectiveError, match="exclude_duplicates"):
        ContrastiveObjective([("audio", "text")], exclude_duplicates="")


_VARIANTS = ("positives", "duplicates", "both")


def _variant_kw(which: str, pos: list[int], dup: list[int], rows: slice) -> dict[str, torch.Tensor]:
    kw = {}
    if which in ("positives", "both"):
        kw["positive_ids"] = torch.tensor(pos)[rows]
    if which in ("duplicates", "both"):
        kw["duplicate_ids"] = torch.tensor(dup)[rows]
    return kw


def _grouped_rank(rank: int, world: int) -> dict:
    a_all, b_all, valid, pos, dup = _grouped_case()
    rows = slice(rank * 6, (rank + 1) * 6)
    out = {}
    for which in _VARIANTS:
        kw = _variant_kw(which, pos, dup, rows)
        out[which] = _grads(lambda x, y, s, kw=kw: contrastive_loss(x, y, s, valid=torch.tensor(valid)[rows],
                                                                     **kw)[0], a_all[rows], b_all[rows], 9.0)
    return out


def test_grouped_options_gathered_over_two_ranks_match_one_rank(two_ranks: list[dict]) -> None:
    """Per variant: mean over ranks of the loss and of d/dscale = the 1-rank values over the concatenated batch;
    each rank's d/da, d/db (summed over ranks by gather_with_grad) / world = the 1-rank gradient of its rows."""
    results = [res["grouped"] for res in two_ranks]
    a_all, b_all, valid, pos, dup = _grouped_case()
    for which in _VARIANTS:
        kw = _variant_kw(which, pos, dup, slice(None))
        global_loss, ga, gb, gs = _grads(lambda x, y, s, kw=kw: contrastive_loss(
            x, y, s, valid=torch.tensor(valid), **kw)[0], a_all, b_all, 9.0)
        _assert_ranks_equal_global([res[which] for res in results], (global_loss, ga, gb, gs), rows_per_rank=6)

"""The contrastive loss against open_clip's ClipLoss, on one rank and gathered over two real gloo ranks."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from objectives.contrastive import ContrastiveObjective, contrastive_loss


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    a_all, b_all = _inputs(8 * world, seed=3)
    a, b = a_all[rank * 8 : (rank + 1) * 8], b_all[rank * 8 : (rank + 1) * 8]
    ours = _grads(lambda x, y, s: contrastive_loss(x, y, s)[0], a, b, 20.0)
    ref = _grads(lambda x, y, s: _open_clip(x, y, s, local_loss=True, gather_with_grad=True, rank=rank,
                                            world_size=world), a, b, 20.0)
    torch.save({"ours": ours, "ref": ref}, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_gathered_over_two_ranks_matches_open_clip_and_the_global_loss(tmp_path: Path) -> None:
    world = 2
    mp.spawn(_rank_main, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    a_all, b_all = _inputs(8 * world, seed=3)
    global_loss, ga, gb, gs = _grads(lambda x, y, s: contrastive_loss(x, y, s)[0], a_all, b_all, 20.0)
    losses, scale_grads = [], []
    for rank in range(world):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for mine, theirs in zip(res["ours"], res["ref"], strict=True):  # loss, d/da, d/db, d/dscale
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
        loss, da, db, ds = res["ours"]
        rows = slice(rank * 8, (rank + 1) * 8)
        # each rank's gradient is d(sum_k L_k)/dx = world * dL/dx; DeepSpeed's averaging divides by world
        torch.testing.assert_close(da / world, ga[rows], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(db / world, gb[rows], rtol=1e-5, atol=1e-7)
        losses.append(loss)
        scale_grads.append(ds)
    torch.testing.assert_close(torch.stack(losses).mean(), global_loss)
    torch.testing.assert_close(torch.stack(scale_grads).mean(), gs)

"""The DeepSpeed engine's cost per step: mmssl's own task stepped by plain torch, for ``mmssl bench --compare open_clip
--bare`` (fp32).

`BareTorchSide` shares the `PretrainTask` (model and objectives) of an `tools.bench.clip_sides.MmsslSide` and runs
what its step computes without the engine: the trainer's feed (the same padding cut and copy), ``task(batch)``,
``loss.backward()``, ``clip_grad_norm_`` at ``train.grad_clip`` and torch AdamW with the engine's kernels
(``train.optimizer_impl``) over the engine's own parameter groups (the same weight-decay split, the learning rate
the engine's schedule is at). No non-finite guard, no DeepSpeed hooks or gradient bookkeeping; so ``mmssl / bare``
is what DeepSpeed's ZeRO-0 engine (and mmssl's one-all-reduce guard) cost, the engine staying mmssl's training path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmssl.pretrain.engine import OPTIMIZER_IMPLS
from mmssl.tools.bench.device import timed


class BareTorchSide:
    name = "mmssl task, bare torch step"

    def __init__(self, mmssl_side: Any) -> None:
        trainer = mmssl_side.trainer
        cfg = trainer.recipe.train
        self.feed, self.task, self.device, self.clip = trainer.feed, mmssl_side.model, mmssl_side.device, cfg.grad_clip
        self.engine_groups = trainer.engine.optimizer.param_groups
        groups = [{"params": list(g["params"]), "weight_decay": g["weight_decay"]} for g in self.engine_groups]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                           **OPTIMIZER_IMPLS[cfg.optimizer_impl])  # the engine's kernels

    def step(self, batch: Any) -> torch.Tensor:
        [(_, moved)] = self.feed.take([batch])
        loss = self.task(moved).loss
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.task.parameters(), self.clip)
        for group, engine_group in zip(self.optimizer.param_groups, self.engine_groups, strict=True):
            group["lr"] = engine_group["lr"]  # the engine's schedule, where it stands
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def run(self, batches: Sequence[Any]) -> float:
        return timed(lambda: [self.step(batch) for batch in batches], self.device)

"""The run's clock and its ``summary.json``: throughput over the timed steps, phase times, memory, data accounting.

Throughput counts every step after the run's first (which pays one-off costs: worker start-up, allocation), with
checkpoint saves excluded: ``samples/s = timed_steps · global_batch / (elapsed - saving)``.
"""

from __future__ import annotations

import contextlib
import json
import resource
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from mmssl.data_pipelines.shards import atomic_write_text
from mmssl.pretrain import checkpoint
from mmssl.pretrain.accounting import merge_reports
from mmssl.pretrain.frozen import optimizer_memory
from mmssl.pretrain.rundir import SUMMARY
from mmssl.pretrain.runlog import hardware_summary, plot_loss_curve
from mmssl.pretrain.step import PHASES

if TYPE_CHECKING:
    from mmssl.pretrain.trainer import Trainer


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def comm_seconds() -> float:
    """Seconds spent in DeepSpeed's collectives so far on this rank (its comms logger; 0 when it is off)."""
    from deepspeed import comm as ds_comm

    logger = ds_comm.comms_logger
    if not logger.enabled:
        return 0.0
    # each op's logged latency is its timer's running total (DeepSpeed stops it with elapsed(reset=False)), so
    # an op's time so far is the largest value logged under its name, over every message size
    return sum(max(max(record[1]) for record in sizes.values()) for sizes in logger.comms_dict.values()) / 1000.0


class StepClock:
    """Throughput and phase time over the timed steps (the module docstring)."""

    def __init__(self, *, first_step: int, profile_comms: bool) -> None:
        self.first_step, self.profile_comms = first_step, profile_comms
        self.start: float | None = None
        self.excluded_s = 0.0
        self.timed_steps = 0
        self.phases = dict.fromkeys(PHASES, 0.0)
        self.comm_start = self.comm_end = 0.0

    def stepped(self, step: int, phases: dict[str, float]) -> None:
        if self.profile_comms:  # snapshots between steps: checkpoint saves' collectives are left out
            self.comm_end = comm_seconds()
        if step == self.first_step + 1:
            self.start = time.perf_counter()
            self.comm_start = self.comm_end
            return
        self.timed_steps += 1
        for phase, seconds in phases.items():
            self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def rate(self, global_batch: int) -> float:
        elapsed = time.perf_counter() - self.start - self.excluded_s if self.start else 0.0
        return self.timed_steps * global_batch / elapsed if elapsed > 0 and self.timed_steps else float("nan")

    def comm_per_step(self) -> float | None:
        return (self.comm_end - self.comm_start) / self.timed_steps if self.profile_comms and self.timed_steps else None

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        if self.start is not None:
            self.excluded_s += time.perf_counter() - t0


def positions_computed(per_rank: list[dict[str, list[int]]]) -> dict[str, float]:
    """``modality -> Σ kept / Σ loaded`` token positions over ranks (`pretrain.transfer.DeviceFeed.positions`)."""
    totals: dict[str, list[int]] = {}
    for positions in per_rank:
        for m, (kept, loaded) in positions.items():
            total = totals.setdefault(m, [0, 0])
            total[0], total[1] = total[0] + kept, total[1] + loaded
    return {m: round(kept / loaded, 4) for m, (kept, loaded) in totals.items() if loaded}


def write_summary(trainer: Trainer, clock: StepClock, recent_losses: list[float],
                  epoch_batches: int | None) -> dict[str, Any]:
    """Gather every rank's memory and data accounting and build the run summary; rank 0 writes ``summary.json``
    and the loss curve. Collective: every rank calls it."""
    recipe, cfg, state, world = trainer.recipe, trainer.recipe.train, trainer.state, trainer.world
    global_batch = recipe.data.batch_size * world * cfg.grad_accum
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, {"peak_rss_mb": round(peak_rss_mb(), 1), "comm_s": clock.comm_per_step(),
                                      "positions": trainer.feed.positions, **trainer.account.report(),
                                      **optimizer_memory(trainer.engine)})
    timed = clock.timed_steps
    summary = {
        "recipe": recipe.name,
        "steps": state.step,
        "samples_per_s": round(clock.rate(global_batch), 2) if timed else None,
        "final_loss": round(sum(recent_losses) / len(recent_losses), 5) if recent_losses else None,
        "final_loss_window_steps": len(recent_losses),
        "world_size": world,
        "global_batch": global_batch,
        "zero_stage": cfg.zero_stage,
        "precision": cfg.precision,
        "deterministic": trainer.deterministic,
        "device": trainer.device.type,
        "hardware": hardware_summary(trainer.device.type),
        "samples_seen": state.samples_seen,
        "steps_per_exact_epoch": epoch_batches / cfg.grad_accum if epoch_batches else None,
        "timed_steps": timed,
        # seconds per micro-batch and phase (CPU clocks; on CUDA only with train.profile_steps, else null)
        "step_time_split_s": ({k: round(v / max(1, timed * cfg.grad_accum), 5) for k, v in clock.phases.items()}
                              if trainer.timer.enabled else None),
        "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in per_rank],
        "peak_device_memory_mb": (round(torch.cuda.max_memory_allocated(trainer.device) / 2**20, 1)
                                  if trainer.device.type == "cuda" else None),
        # train.profile_comms: seconds per timed step in DeepSpeed's collectives (inside backward / optimizer)
        "communication_s_per_step": [r["comm_s"] for r in per_rank] if cfg.profile_comms else None,
        **merge_reports(per_rank),
        "nonfinite_steps": state.nonfinite_steps,
        # data.trim_padding: the fraction of the loaded token positions (max_len per row) the towers ran
        "token_positions_computed": positions_computed([r["positions"] for r in per_rank]),
        "channels_last_towers": trainer.channels_last,  # train.channels_last: the towers fed NHWC inputs
        **trainer.sizes,
        "frozen_parameters": trainer.frozen["parameters"] if trainer.frozen else 0,
        "memory_bytes_per_rank": {k: [r[k] for r in per_rank] for k in
                                  ("optimizer_state_bytes", "master_weight_bytes")},
        "checkpoint": str(trainer.run_dir / checkpoint.CHECKPOINTS / checkpoint.tag_for(state.step)),
    }
    if trainer.rank == 0:
        curve = plot_loss_curve(trainer.run_dir)
        summary["loss_curve"] = str(curve) if curve else None
        atomic_write_text(trainer.run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
        trainer.log.info("done: %s", json.dumps({k: summary[k] for k in ("steps", "samples_per_s", "final_loss")}))
    return summary

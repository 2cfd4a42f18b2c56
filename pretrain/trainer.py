"""The pretraining loop on a DeepSpeed engine.

Per optimizer step (`pretrain.step.optimizer_step`) and per micro-batch: wait for the next batch (data time), check
it is the batch the resume position expects (`pretrain.accounting`), move it to the device in the compute dtype
(`pretrain.transfer`, one batch ahead on CUDA), ``engine(batch)`` (forward), ``engine.backward(loss)``,
``engine.step()`` (optimizer + LR schedule at accumulation boundaries). A step makes no host-device
synchronisation: losses, terms, metrics and non-finite flags are buffered on the device and reduced over ranks
in one collective every ``log_every`` steps. Checkpoints every ``ckpt_every`` steps and at the end record the
step, the next batch index of the stream and the RNG states, so ``train.resume=latest`` continues with exactly the
samples an uninterrupted run would have seen.

Faults:

* **Non-finite loss or gradient.** The update of such a step is skipped on *every* rank (how, per ZeRO stage:
  `pretrain.step`): its batches are consumed, the step counter (checkpoint tags, ``train.steps``, the stream
  position) advances, but the optimizer, Adam's step count and the LR schedule do not (they count applied updates,
  so the schedule lags one step per skipped step; it is saved in the checkpoint, so a resume is exact). Each event
  is logged at the next log step with its step and the ranks whose loss was NaN/inf, and counted in summary.json
  (``nonfinite_steps``); more than ``train.max_nonfinite_steps`` *consecutive* ones abort the run on every rank
  with `TrainingDivergedError` (consecutive, so rare spikes in a long run are tolerated but divergence is not).
* **Dead rank.** Every collective waits at most ``train.collective_timeout_s`` (the process-group timeout), then
  fails on the surviving ranks; the launcher (torchrun) also stops the job when a rank process dies.
* **Unreachable shards** are retried and skipped by the stream (`data_pipelines.stream`); their count reaches
  summary.json's ``data_errors`` like every other data fault.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmssl.architectures.config import build_model, model_summary
from mmssl.architectures.layout import use_channels_last
from mmssl.data_pipelines.batch import Batch
from mmssl.objectives.registry import build_objectives
from mmssl.pretrain import checkpoint
from mmssl.pretrain.accounting import DataAccount, KeyLog
from mmssl.pretrain.data import batches_per_epoch, build_loader, device_transforms, feature_source
from mmssl.pretrain.distributed import init_distributed, seed_everything, set_threads
from mmssl.pretrain.engine import build_engine
from mmssl.pretrain.frozen import frozen_reference, frozen_state_sha256
from mmssl.pretrain.precision import attention_backends, compute_dtype, configure_numerics, input_dtype
from mmssl.pretrain.recipe import Recipe, RecipeError, to_dict
from mmssl.pretrain.runlog import MetricsWriter, metric_sinks, setup_text_logs
from mmssl.pretrain.step import NonFiniteGuard, PhaseTimer, StepResult, optimizer_step
from mmssl.pretrain.storage import RunStorage, probe_storage
from mmssl.pretrain.summary import StepClock, write_summary
from mmssl.pretrain.task import PretrainTask
from mmssl.pretrain.transfer import DeviceFeed, trimmed_modalities

BatchSource = Callable[[int, int, int], Iterator[Batch]]
"""``(rank, world_size, start_batch) -> iterator of batches``: replaces the shard stream (tests, custom data)."""


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    next_batch: int = 0  # index of the next batch this rank's stream yields
    samples_seen: int = 0  # over all ranks
    world_size: int = 1
    nonfinite_steps: int = 0  # steps whose loss was NaN/inf on some rank (update skipped), over the whole run
    nonfinite_run: int = 0  # of those, how many came in a row up to now


class TrainingDivergedError(RecipeError):
    """More than ``train.max_nonfinite_steps`` consecutive steps had a NaN/inf loss on some rank."""


class Trainer:
    """One rank of a pretraining run: ``Trainer(recipe, run_dir).fit()`` trains (or resumes) and returns the
    summary. ``model`` is the live model (full parameters at ZeRO 0-2); `step` runs one optimizer step."""

    def __init__(self, recipe: Recipe, run_dir: Path, *, batches: BatchSource | None = None,
                 storage: RunStorage | None = None) -> None:
        self.recipe, self.run_dir = recipe, run_dir
        cfg = recipe.train
        self.rank, self.world, self.device = init_distributed(cfg.collective_timeout_s)
        self.storage = storage or probe_storage(run_dir)
        self.log = setup_text_logs(run_dir, self.rank)
        set_threads(cfg.threads)
        self.deterministic = configure_numerics(cfg, self.device)
        seed_everything(cfg.seed)
        self.dtype = compute_dtype(cfg.precision)
        self.model = build_model(recipe.model, seed=cfg.seed, frozen_dtype=self.dtype)
        self.channels_last = use_channels_last(self.model, cfg.channels_last)
        if cfg.compile:  # in place (nn.Module.compile): parameter names and checkpoints are unchanged
            for tower in getattr(self.model, "towers", {}).values():
                tower.compile()
        objectives, weights = build_objectives(recipe.objectives, self.model.spec)
        task = PretrainTask(self.model, objectives, weights, attention_backends(cfg, self.device))
        self.frozen = frozen_reference(self.model, task, self.dtype)  # before ZeRO-3 partitions the weights
        self.sizes = model_summary(self.model)  # likewise
        self.engine, _, self.scheduler = build_engine(task, cfg, recipe.data.batch_size, self.world,
                                                      node_local=self.storage.node_local)
        self.objectives = list(self.engine.module.objectives.items())
        seed_everything(cfg.seed + self.rank)
        self.positions: dict[int, Any] = {}  # virtual stream -> its position after the last batch consumed
        self.state = self._resume() if cfg.resume else TrainerState(world_size=self.world)
        self.from_shards = batches is None
        if batches is not None:
            source = batches(self.rank, self.world, self.state.next_batch)
        else:
            source = iter(build_loader(recipe, rank=self.rank, world_size=self.world,
                                       start_batch=self.state.next_batch, pin_memory=self.device.type == "cuda",
                                       positions=self.positions, compact=True))
        trimmed = trimmed_modalities(self.model.spec.modalities, self.engine.module.objectives.values(),
                                     enabled=recipe.data.trim_padding)
        self.feed = DeviceFeed(source, self.device, input_dtype(cfg.precision),
                               device_transforms(recipe) if batches is None else None, trim=trimmed,
                               group=cfg.grad_accum if trimmed and cfg.accumulation == "cached" else 1)
        self.keylog = KeyLog(run_dir, self.rank, cfg.log_keys, self.state.step)
        self.account = DataAccount(self.rank, self.state.next_batch, self.positions, self.keylog)
        self.guard = NonFiniteGuard(self.engine, rank=self.rank, world=self.world, device=self.device)
        self.timer = PhaseTimer(self.device, profile=cfg.profile_steps)

    def _resume(self) -> TrainerState:
        found = checkpoint.agree_resume(self.run_dir, self.recipe.train.resume or "latest")
        if found is None:
            self.log.info("train.resume: no checkpoint in %s yet; starting from step 0", self.run_dir)
            return TrainerState(world_size=self.world)
        state = TrainerState(**checkpoint.load(self.engine, *found, frozen=self.frozen))
        if state.world_size != self.world:
            raise checkpoint.CheckpointError(
                f"checkpoint {found[1]} was written by {state.world_size} ranks; resume needs the same world size "
                f"(got {self.world}) to continue the same sample order"
            )
        self.positions = checkpoint.load_stream(*found) or {}
        self.log.info("resumed from %s at step %d (next batch %d, %s)", found[1], state.step, state.next_batch,
                      f"stream positions of {len(self.positions)} virtual stream(s)" if self.positions else
                      "no stream position: the stream replays up to it")
        return state

    def _refresh_pseudo_labels(self, step: int) -> dict[str, float]:
        """Run each due pseudo-label service (``refresh_every``) on a feature pass of the current model; at step 0
        and at every multiple, so a resumed run refreshes exactly where an uninterrupted one would."""
        metrics: dict[str, float] = {}
        for name, objective in self.objectives:
            every = objective.refresh_every
            if every and step % every == 0:
                t0 = time.perf_counter()
                found = objective.refresh(step, feature_source(self.recipe, self.model, rank=self.rank,
                                                               world_size=self.world, device=self.device))
                metrics.update({f"{name}/{k}": float(v) for k, v in found.items()})
                self.log.info("step %d: refreshed %s pseudo-labels in %.1fs %s", step, name,
                              time.perf_counter() - t0, found)
        return metrics

    def step(self) -> StepResult:
        """One optimizer step (`pretrain.step.optimizer_step`) on the next ``train.grad_accum`` batches, then the
        objectives' after-step updates (EMA teachers, ...) when the update was applied, and the non-finite count.
        No host-device synchronisation (besides ZeRO-0's guard)."""
        cfg = self.recipe.train
        data_wait = 0.0

        def fetch() -> Batch:
            nonlocal data_wait
            t0 = time.perf_counter()
            host, batch = next(self.feed)
            data_wait += time.perf_counter() - t0
            self.account.take(host, self.state.step)
            return batch

        result = optimizer_step(self.engine, fetch, grad_accum=cfg.grad_accum, cached=cfg.accumulation == "cached",
                                guard=self.guard, timer=self.timer)
        result.phases["data_wait"] = data_wait
        state = self.state
        state.next_batch = self.account.next_batch
        if result.applied:
            state.nonfinite_run = 0
            for _, objective in self.objectives:
                objective.after_step(self.model)
        else:
            state.nonfinite_steps += 1
            state.nonfinite_run += 1
            if state.nonfinite_run > cfg.max_nonfinite_steps:
                self._diverged(result)
        state.step += 1
        state.samples_seen += self.recipe.data.batch_size * self.world * cfg.grad_accum
        return result

    def _nonfinite_message(self, step: int, ranks: list[int], run: int, total: int) -> str:
        cfg = self.recipe.train
        return (f"step {step}: non-finite loss on rank(s) {ranks}; update skipped on every rank ({run} in a row, "
                f"{total} in all, train.max_nonfinite_steps={cfg.max_nonfinite_steps})")

    def _diverged(self, result: StepResult) -> None:
        """Abort: every rank skipped this update (the decision is global), so every rank is here together."""
        flags = result.nonfinite.clone()
        if self.world > 1:
            dist.all_reduce(flags)
        ranks = [r for r, f in enumerate(flags.tolist()) if f]
        state, cfg = self.state, self.recipe.train
        self.log.warning("%s", self._nonfinite_message(state.step + 1, ranks, state.nonfinite_run,
                                                       state.nonfinite_steps))
        raise TrainingDivergedError(
            f"step {state.step + 1}: the loss or gradient was NaN/inf (loss on rank(s) {ranks}) for "
            f"{state.nonfinite_run} consecutive step(s), more than train.max_nonfinite_steps="
            f"{cfg.max_nonfinite_steps}; lower train.lr, raise train.warmup_steps or train.grad_clip, or check the data"
        )

    def _record(self, result: StepResult, refreshed: dict[str, float]) -> dict[str, Any]:
        """The step's log record; tensors stay on the device until `_write_records`."""
        scale = next((v for k, v in result.metrics.items() if k.endswith("logit_scale")), None)
        state = self.state
        return {"step": state.step, "loss": result.loss, "terms": result.terms, "nonfinite": result.nonfinite,
                # objectives' own metrics (accuracies, cluster sizes, ...): rank 0's values, not reduced
                "metrics": result.metrics if self.rank == 0 else {}, "applied": result.applied,
                "run": state.nonfinite_run, "total": state.nonfinite_steps, "lr": self.scheduler.get_last_lr()[0],
                "logit_scale": scale, "data_wait_s": round(result.phases["data_wait"], 5), **refreshed}

    def _write_records(self, pending: list[dict[str, Any]], writer: MetricsWriter, rate: float) -> list[float]:
        """Reduce the buffered records over ranks in one collective, log non-finite steps, write the metrics;
        returns the records' mean losses."""
        names = sorted(pending[0]["terms"])
        rows = torch.stack([torch.cat([torch.stack([p["loss"], *(p["terms"][n] for n in names)]), p["nonfinite"]])
                            for p in pending])  # [records, 1 + terms + world]
        if self.world > 1:
            dist.all_reduce(rows)
        values = rows.tolist()
        losses = []
        for record, row in zip(pending, values, strict=True):
            means = [v / self.world for v in row[: 1 + len(names)]]
            bad = [r for r, f in enumerate(row[1 + len(names):]) if f]
            if bad or not record["applied"]:
                self.log.warning("%s", self._nonfinite_message(record["step"], bad, record["run"], record["total"]))
            scale = float(record["logit_scale"]) if record["logit_scale"] is not None else float("nan")
            out = {k: v for k, v in record.items() if k not in ("step", "loss", "terms", "nonfinite", "metrics",
                                                                 "applied", "run", "total", "logit_scale")}
            out.update({f"loss/{n}": v for n, v in zip(names, means[1:], strict=True)})
            out.update({f"rank0/{k}": float(v) for k, v in record["metrics"].items()})
            out.update(logit_scale=scale, temperature=1.0 / scale if scale else float("nan"), loss=means[0],
                       samples_per_s=rate)
            writer.write(record["step"], out)
            losses.append(means[0])
        return losses

    def _save(self) -> None:
        state = self.state
        frozen = self.frozen and {**self.frozen, "state_sha256": frozen_state_sha256(self.model, self.dtype)}
        tag = checkpoint.save(self.engine, self.run_dir, state.step, asdict(state),
                              keep_last=self.recipe.train.keep_last, storage=self.storage, frozen=frozen,
                              stream=self.positions or None)
        self.log.info("saved checkpoint %s", tag)

    def fit(self) -> dict[str, Any]:
        recipe, rank, world, cfg, state = self.recipe, self.rank, self.world, self.recipe.train, self.state
        stop = min(cfg.stop_at, cfg.steps) if cfg.stop_at else cfg.steps
        global_batch = recipe.data.batch_size * world * cfg.grad_accum
        writer = MetricsWriter(self.run_dir, enabled=rank == 0, sinks=metric_sinks(cfg), total_steps=cfg.steps,
                               start_step=state.step, wandb=cfg.wandb, config=to_dict(recipe))
        epoch_batches = batches_per_epoch(recipe, world) if self.from_shards else None
        if rank == 0:
            self.log.info("pretraining %s: %d ranks, global batch %d, ZeRO-%d, %s, %s", recipe.name, world,
                          global_batch, cfg.zero_stage, cfg.precision, self.sizes)
            if epoch_batches:
                self.log.info("exact epochs: %d batches per rank per epoch = %.2f steps (train.steps=%d is %.2f "
                              "epochs)", epoch_batches, epoch_batches / cfg.grad_accum, cfg.steps,
                              cfg.steps * cfg.grad_accum / epoch_batches)
        clock = StepClock(first_step=state.step, profile_comms=cfg.profile_comms)
        pending: list[dict[str, Any]] = []  # per-step records, written at the next log step
        recent_losses: list[float] = []
        while state.step < stop:
            refreshed = self._refresh_pseudo_labels(state.step)
            result = self.step()
            clock.stepped(state.step, result.phases)
            pending.append(self._record(result, refreshed))
            last = state.step == stop
            if state.step % cfg.log_every == 0 or last:
                losses = self._write_records(pending, writer, clock.rate(global_batch))
                recent_losses = (recent_losses + [v for v in losses if math.isfinite(v)])[-10:]
                writer.flush(state.step, {"loss": losses[-1], "samples/s": clock.rate(global_batch)})
                pending.clear()
            if (cfg.ckpt_every and state.step % cfg.ckpt_every == 0) or last:
                with clock.excluded():
                    self._save()
        writer.close()
        self.keylog.close()
        return write_summary(self, clock, recent_losses, epoch_batches)

def train(recipe: Recipe, run_dir: Path, *, batches: BatchSource | None = None,
          storage: RunStorage | None = None) -> dict[str, Any]:
    """Run (or resume) pretraining as one rank of the current process group; returns the run summary.
    ``storage``: the run directory's layout (`pretrain.storage.probe_storage`; probed here when not given)."""
    return Trainer(recipe, run_dir, batches=batches, storage=storage).fit()

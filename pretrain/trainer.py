"""The pretraining loop on a DeepSpeed engine.

Per optimizer step and per micro-batch: wait for the next batch (data time), check it is the batch the resume
position expects, move it to the device (casting floats to bf16 when training in bf16), ``engine(batch)``
(forward), ``engine.backward(loss)``, ``engine.step()`` (optimizer + LR schedule at accumulation boundaries).
Losses are buffered on the device and reduced over ranks only every ``log_every`` steps. Checkpoints every
``ckpt_every`` steps and at the end record the step, the next batch index of the stream and the RNG states, so
``train.resume=latest`` continues with exactly the samples an uninterrupted run would have seen.

Faults:

* **Non-finite loss.** Once the step's loss is known, one all-reduce of a per-rank flag tells every rank which ranks
  saw a NaN/inf loss, so all ranks take the same decision (a host sync per step). With ``train.grad_accum=1``, and
  with ``grad_accum > 1`` under the gradient cache (``train.accumulation=cached``, where the loss of the whole
  accumulated batch is known before any backward), such a step's backward passes and ``engine.step()`` are skipped
  on *every* rank: its batches are consumed, the step counter (checkpoint tags, ``train.steps``, the stream
  position) advances, but the optimizer, Adam's step count and the LR schedule do not (they count applied
  updates, so the schedule lags one step per skipped step; it is saved in the checkpoint, so a resume is exact).
  With naive accumulation the micro-batches have already been back-propagated when the step's loss is known: the
  step is counted and bounded the same way, and the update itself is left to DeepSpeed's own guard (ZeRO-1/2 drop
  a step whose gradient norm is non-finite). Each event is logged with its step and ranks and counted in
  summary.json (``nonfinite_steps``); more than ``train.max_nonfinite_steps`` *consecutive* ones abort the run on
  every rank with `TrainingDivergedError` (consecutive, so rare spikes in a long run are tolerated but divergence
  is not).
* **Dead rank.** Every collective waits at most ``train.collective_timeout_s`` (the process-group timeout), then
  fails on the surviving ranks; the launcher (torchrun) also stops the job when a rank process dies.
* **Unreachable shards** are retried and skipped by the stream (`data_pipelines.stream`); their count reaches
  summary.json's ``data_errors`` like every other data fault.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from architectures.config import build_model, model_summary
from data_pipelines.batch import Batch
from data_pipelines.shards import atomic_write_text
from objectives.registry import build_objectives
from pretrain import checkpoint
from pretrain.accumulation import cached_accumulation_step
from pretrain.data import batches_per_epoch, build_loader, feature_source
from pretrain.engine import build_engine
from pretrain.frozen import frozen_reference, frozen_state_sha256, optimizer_memory
from pretrain.precision import compute_dtype, input_dtype
from pretrain.recipe import Recipe, RecipeError
from pretrain.runlog import MetricsWriter, hardware_summary, plot_loss_curve, setup_text_logs
from pretrain.storage import RunStorage, probe_storage
from pretrain.task import PretrainTask

SUMMARY = "summary.json"
PHASES = ("data_wait", "forward", "backward", "optimizer")
MAX_LISTED_FAULTS = 10000

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


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed: NCCL on GPUs, gloo on CPU. Works under torchrun, the
    deepspeed launcher, or a bare process (then it is a world of one). ``timeout_s`` (``train.collective_timeout_s``)
    bounds every collective: one still waiting on a dead or hung rank after that long raises on the waiting ranks.
    A process group that already exists is kept as it is (with the timeout it was created with)."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _comm_seconds() -> float:
    """Seconds spent in DeepSpeed's collectives so far on this rank (its comms logger; 0 when it is off)."""
    from deepspeed import comm as ds_comm

    logger = ds_comm.comms_logger
    if not logger.enabled:
        return 0.0
    # each op's logged latency is its timer's running total (DeepSpeed stops it with elapsed(reset=False)), so
    # an op's time so far is the largest value logged under its name, over every message size
    return sum(max(max(record[1]) for record in sizes.values()) for sizes in logger.comms_dict.values()) / 1000.0


class _KeyLog:
    """``keys/rank<N>.jsonl``: the sample keys of every batch consumed (``train.log_keys``)."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool, resumed_step: int) -> None:
        self.file = None
        if not enabled:
            return
        path = run_dir / "keys" / f"rank{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resumed_step and path.exists():  # drop what a killed run consumed after its last checkpoint
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] < resumed_step]
        path.write_text("".join(ln + "\n" for ln in kept))
        self.file = path.open("a", buffering=1)  # line-buffered: a kill loses no finished line

    def write(self, step: int, batch: Batch) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "batch": batch.index, "keys": batch.keys}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class Trainer:
    """One rank of a pretraining run: ``Trainer(recipe, run_dir).fit()`` trains (or resumes) and returns the
    summary. ``model`` is the live model (full parameters at ZeRO 0-2)."""

    def __init__(self, recipe: Recipe, run_dir: Path, *, batches: BatchSource | None = None,
                 storage: RunStorage | None = None) -> None:
        self.recipe, self.run_dir = recipe, run_dir
        cfg = recipe.train
        self.rank, self.world, self.device = init_distributed(cfg.collective_timeout_s)
        self.storage = storage or probe_storage(run_dir)
        self.log = setup_text_logs(run_dir, self.rank)
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        torch.set_num_threads(threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            # Deterministic mode also NaN-fills every torch.empty; nothing here reads uninitialised memory, and
            # the fill costs a pass over every buffer DeepSpeed allocates.
            torch.utils.deterministic.fill_uninitialized_memory = False
        _seed_everything(cfg.seed)
        self.model = build_model(recipe.model, seed=cfg.seed)
        objectives, weights = build_objectives(recipe.objectives, self.model.spec)
        task = PretrainTask(self.model, objectives, weights)
        self.dtype = compute_dtype(cfg.precision)
        self.frozen = frozen_reference(self.model, task, self.dtype)  # before ZeRO-3 partitions the weights
        self.engine, _, self.scheduler = build_engine(task, cfg, recipe.data.batch_size, self.world,
                                                      node_local=self.storage.node_local)
        _seed_everything(cfg.seed + self.rank)
        self.positions: dict[int, Any] = {}  # virtual stream -> its position after the last batch consumed
        self.state = self._resume() if cfg.resume else TrainerState(world_size=self.world)
        self.from_shards = batches is None
        if batches is not None:
            self.source = batches(self.rank, self.world, self.state.next_batch)
        else:
            self.source = iter(build_loader(recipe, rank=self.rank, world_size=self.world,
                                            start_batch=self.state.next_batch, pin_memory=self.device.type == "cuda",
                                            positions=self.positions))

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

    def _refresh_pseudo_labels(self, step: int, objectives: list[tuple[str, Any]]) -> dict[str, float]:
        """Run each due pseudo-label service (``refresh_every``) on a feature pass of the current model; at step 0
        and at every multiple, so a resumed run refreshes exactly where an uninterrupted one would."""
        metrics: dict[str, float] = {}
        for name, objective in objectives:
            every = objective.refresh_every
            if every and step % every == 0:
                t0 = time.perf_counter()
                found = objective.refresh(step, feature_source(self.recipe, self.model, rank=self.rank,
                                                               world_size=self.world, device=self.device))
                metrics.update({f"{name}/{k}": float(v) for k, v in found.items()})
                self.log.info("step %d: refreshed %s pseudo-labels in %.1fs %s", step, name,
                              time.perf_counter() - t0, found)
        return metrics

    def _nonfinite_ranks(self, loss: torch.Tensor) -> list[int]:
        """The ranks whose ``loss`` is NaN/inf, the same list on every rank (one all-reduce of a [world] flag)."""
        flags = torch.zeros(self.world, device=self.device)
        flags[self.rank] = (~torch.isfinite(loss.detach().float())).float()
        dist.all_reduce(flags)
        return [r for r, flag in enumerate(flags.tolist()) if flag]

    def _count_nonfinite(self, bad_ranks: list[int]) -> None:
        """Record a non-finite step (``bad_ranks`` not empty) or the end of a run of them; abort past the bound."""
        cfg, state = self.recipe.train, self.state
        if not bad_ranks:
            state.nonfinite_run = 0
            return
        state.nonfinite_steps += 1
        state.nonfinite_run += 1
        exact = cfg.grad_accum == 1 or cfg.accumulation == "cached"
        held = "skipped on every rank" if exact else "left to DeepSpeed's overflow guard (naive accumulation)"
        self.log.warning("step %d: non-finite loss on rank(s) %s; update %s (%d in a row, %d in all, "
                         "train.max_nonfinite_steps=%d)", state.step + 1, bad_ranks, held, state.nonfinite_run,
                         state.nonfinite_steps, cfg.max_nonfinite_steps)
        if state.nonfinite_run > cfg.max_nonfinite_steps:
            raise TrainingDivergedError(
                f"step {state.step + 1}: the loss was NaN/inf (on rank(s) {bad_ranks}) for {state.nonfinite_run} "
                f"consecutive step(s), more than train.max_nonfinite_steps={cfg.max_nonfinite_steps}; lower "
                f"train.lr, raise train.warmup_steps or train.grad_clip, or check the data"
            )

    def fit(self) -> dict[str, Any]:
        recipe, run_dir, rank, world, device = self.recipe, self.run_dir, self.rank, self.world, self.device
        cfg, engine, state, log = recipe.train, self.engine, self.state, self.log
        stop = min(cfg.stop_at, cfg.steps) if cfg.stop_at else cfg.steps
        float_dtype = input_dtype(cfg.precision)
        global_batch = recipe.data.batch_size * world * cfg.grad_accum
        writer = MetricsWriter(run_dir, enabled=rank == 0, tensorboard=cfg.tensorboard, total_steps=cfg.steps,
                               start_step=state.step)
        keylog = _KeyLog(run_dir, rank, cfg.log_keys, state.step)
        epoch_batches = batches_per_epoch(recipe, world) if self.from_shards else None
        if rank == 0:
            log.info("pretraining %s: %d ranks, global batch %d, ZeRO-%d, %s, %s", recipe.name, world,
                     global_batch, cfg.zero_stage, cfg.precision, model_summary(self.model))
            if epoch_batches:
                log.info("exact epochs: %d batches per rank per epoch = %.2f steps (train.steps=%d is %.2f epochs)",
                         epoch_batches, epoch_batches / cfg.grad_accum, cfg.steps,
                         cfg.steps * cfg.grad_accum / epoch_batches)

        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        timings = dict.fromkeys(PHASES, 0.0)
        data_errors: Counter[str] = Counter()
        source_rows: Counter[str] = Counter()  # rows per data source, and "(padding)" rows of exact epochs
        faults: dict[tuple[str, ...], dict[str, str]] = {}  # every skipped piece of data, once
        pending: list[dict[str, Any]] = []  # per-step records, written at the next log step
        recent_losses: list[float] = []
        first_step = state.step
        timed_start: float | None = None
        comm_start = comm_end = 0.0
        timed_steps = 0
        checkpoint_s = 0.0  # excluded from throughput
        objectives = list(self.engine.module.objectives.items())
        while state.step < stop:
            refreshed = self._refresh_pseudo_labels(state.step, objectives)
            data_wait = 0.0

            def fetch() -> Batch:
                nonlocal data_wait
                t0 = time.perf_counter()
                batch = next(self.source)
                data_wait += time.perf_counter() - t0
                if batch.index != state.next_batch:
                    raise RuntimeError(f"stream out of order on rank {rank}: got batch {batch.index}, "
                                       f"expected {state.next_batch}")
                state.next_batch += 1
                for name, count in batch.stats.items():
                    if name.startswith("source_rows/"):
                        source_rows[name.split("/", 1)[1]] += count
                    elif name == "padding_rows":
                        source_rows["(padding)"] += count
                    else:
                        data_errors[name] += count
                for fault in batch.faults:
                    faults.setdefault((fault["kind"], fault["shard"], fault["key"], fault["member"]), fault)
                if batch.position is not None:
                    self.positions[int(batch.position["stream"])] = batch.position
                keylog.write(state.step, batch)
                return batch.to(device, float_dtype=float_dtype, non_blocking=True)

            split = dict.fromkeys(PHASES, 0.0)
            bad_ranks: list[int] = []
            if cfg.grad_accum > 1 and cfg.accumulation == "cached":
                batches = [fetch() for _ in range(cfg.grad_accum)]
                t0 = time.perf_counter()

                def proceed(result: Any) -> bool:
                    nonlocal bad_ranks
                    bad_ranks = self._nonfinite_ranks(result.loss)
                    return not bad_ranks

                out = cached_accumulation_step(engine, batches, proceed=proceed)
                sync()
                split["forward"] = time.perf_counter() - t0  # cache + loss + re-forward + backward, not split
                step_loss = out.loss.detach().float()
            else:
                step_loss = torch.zeros((), device=device)
                for _ in range(cfg.grad_accum):
                    batch = fetch()
                    t1 = time.perf_counter()
                    out = engine(batch)
                    sync()
                    t2 = time.perf_counter()
                    if cfg.grad_accum == 1 and (bad_ranks := self._nonfinite_ranks(out.loss)):
                        step_loss += out.loss.detach().float()
                        split["forward"] += t2 - t1
                        continue  # no backward, no engine.step(): optimizer, Adam and LR schedule stand still
                    engine.backward(out.loss)
                    sync()
                    t3 = time.perf_counter()
                    engine.step()
                    sync()
                    t4 = time.perf_counter()
                    step_loss += out.loss.detach().float() / cfg.grad_accum
                    for phase, dt in zip(PHASES[1:], (t2 - t1, t3 - t2, t4 - t3), strict=True):
                        split[phase] += dt
            split["data_wait"] = data_wait
            if cfg.grad_accum > 1 and cfg.accumulation != "cached":  # already applied; its loss is known only now
                bad_ranks = self._nonfinite_ranks(step_loss)
            self._count_nonfinite(bad_ranks)
            for _, objective in objectives if not bad_ranks else ():
                objective.after_step(self.model)
            if state.step > first_step:  # the first step pays one-off costs (worker start-up, allocation)
                for phase in PHASES:
                    timings[phase] += split[phase]
            # tensors stay on the device until the next log step: no host sync inside the step
            scale = next((v.detach().float() for k, v in out.metrics.items() if k.endswith("logit_scale")), None)
            terms = {k: v.detach().float() for k, v in out.terms.items()}
            # objectives' own metrics (accuracies, cluster sizes, ...): rank 0's values, not reduced
            metrics = {k: v.detach().float() for k, v in out.metrics.items() if rank == 0 and v.numel() == 1}
            state.step += 1
            state.samples_seen += global_batch
            if cfg.profile_comms:  # snapshots between steps: checkpoint saves' collectives are left out
                comm_end = _comm_seconds()
            if state.step == first_step + 1:
                timed_start = time.perf_counter()
                comm_start = comm_end
            else:
                timed_steps += 1
            pending.append({"step": state.step, "loss": step_loss, "terms": terms, "metrics": metrics,
                            "lr": self.scheduler.get_last_lr()[0], "logit_scale": scale,
                            "data_wait_s": round(data_wait, 5), **refreshed})

            last = state.step == stop
            if state.step % cfg.log_every == 0 or last:
                names = sorted(pending[0]["terms"])
                rows = []
                for p in pending:
                    terms = p.pop("terms")
                    rows.append(torch.stack([p["loss"], *(terms[n] for n in names)]))
                values = torch.stack(rows)  # [records, 1 + terms], reduced in one collective
                dist.all_reduce(values)
                values = (values / world).tolist()
                losses = [row[0] for row in values]
                for record, row in zip(pending, values, strict=True):
                    record.update({f"loss/{n}": v for n, v in zip(names, row[1:], strict=True)})
                    record.update({f"rank0/{k}": float(v) for k, v in record.pop("metrics").items()})
                    scale_value = float(record["logit_scale"]) if record["logit_scale"] is not None else float("nan")
                    record["logit_scale"] = scale_value
                    record["temperature"] = 1.0 / scale_value if scale_value else float("nan")
                elapsed = time.perf_counter() - timed_start - checkpoint_s if timed_start else 0.0
                rate = timed_steps * global_batch / elapsed if elapsed > 0 and timed_steps else float("nan")
                for record, loss in zip(pending, losses, strict=True):
                    writer.write(record.pop("step"), {**record, "loss": loss, "samples_per_s": rate})
                recent_losses = (recent_losses + [v for v in losses if math.isfinite(v)])[-10:]
                writer.flush(state.step, {"loss": losses[-1], "samples/s": rate})
                pending.clear()
            if (cfg.ckpt_every and state.step % cfg.ckpt_every == 0) or last:
                t_save = time.perf_counter()
                frozen = self.frozen and {**self.frozen, "state_sha256": frozen_state_sha256(self.model, self.dtype)}
                tag = checkpoint.save(engine, run_dir, state.step, asdict(state), keep_last=cfg.keep_last,
                                      storage=self.storage, frozen=frozen, stream=self.positions or None)
                checkpoint_s += time.perf_counter() - t_save if timed_start else 0.0
                log.info("saved checkpoint %s", tag)

        writer.close()
        keylog.close()
        wall = time.perf_counter() - timed_start - checkpoint_s if timed_start else 0.0
        per_rank: list[Any] = [None] * world
        comm_per_step = (comm_end - comm_start) / timed_steps if cfg.profile_comms and timed_steps else None
        dist.all_gather_object(per_rank, {"peak_rss_mb": round(_peak_rss_mb(), 1), "comm_s": comm_per_step,
                                          "data_errors": dict(data_errors),
                                          "source_rows": dict(source_rows), "faults": list(faults.values()),
                                          **optimizer_memory(engine)})
        total_errors: Counter[str] = Counter()
        total_rows: Counter[str] = Counter()
        all_faults: dict[tuple[str, ...], dict[str, str]] = {}
        for r in per_rank:
            total_errors.update(r["data_errors"])
            total_rows.update(r["source_rows"])
            for f in r["faults"]:
                all_faults.setdefault((f["shard"], f["key"], f["member"], f["kind"]), f)
        listed = [all_faults[k] for k in sorted(all_faults)][:MAX_LISTED_FAULTS]
        summary = {
            "recipe": recipe.name,
            "steps": state.step,
            "samples_per_s": round(timed_steps * global_batch / wall, 2) if wall > 0 and timed_steps else None,
            "final_loss": round(sum(recent_losses) / len(recent_losses), 5) if recent_losses else None,
            "final_loss_window_steps": len(recent_losses),
            "world_size": world,
            "global_batch": global_batch,
            "zero_stage": cfg.zero_stage,
            "precision": cfg.precision,
            "device": device.type,
            "hardware": hardware_summary(device.type),
            "samples_seen": state.samples_seen,
            "steps_per_exact_epoch": epoch_batches / cfg.grad_accum if epoch_batches else None,
            "timed_steps": timed_steps,
            "step_time_split_s": {k: round(v / max(1, timed_steps * cfg.grad_accum), 5) for k, v in timings.items()},
            "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in per_rank],
            # train.profile_comms: seconds per timed step in DeepSpeed's collectives (inside backward / optimizer)
            "communication_s_per_step": [r["comm_s"] for r in per_rank] if cfg.profile_comms else None,
            "data_errors": dict(total_errors),
            # each skipped shard / sample member once (shard, key, member, kind, error), first MAX_LISTED_FAULTS
            "data_faults": listed,
            "data_faults_unlisted": max(0, len(all_faults) - len(listed)),
            "rows_per_source": dict(total_rows),
            "nonfinite_steps": state.nonfinite_steps,
            **model_summary(self.model),
            "frozen_parameters": self.frozen["parameters"] if self.frozen else 0,
            "memory_bytes_per_rank": {k: [r[k] for r in per_rank] for k in
                                      ("optimizer_state_bytes", "master_weight_bytes")},
            "checkpoint": str(run_dir / checkpoint.CHECKPOINTS / checkpoint.tag_for(state.step)),
        }
        if rank == 0:
            curve = plot_loss_curve(run_dir)
            summary["loss_curve"] = str(curve) if curve else None
            atomic_write_text(run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
            log.info("done: %s", json.dumps({k: summary[k] for k in ("steps", "samples_per_s", "final_loss")}))
        return summary


def train(recipe: Recipe, run_dir: Path, *, batches: BatchSource | None = None,
          storage: RunStorage | None = None) -> dict[str, Any]:
    """Run (or resume) pretraining as one rank of the current process group; returns the run summary.
    ``storage``: the run directory's layout (`pretrain.storage.probe_storage`; probed here when not given)."""
    return Trainer(recipe, run_dir, batches=batches, storage=storage).fit()

"""One optimizer step of the trainer: k micro-batches -> forward -> backward -> update, and the non-finite guard.

A step makes no host-device synchronisation: its loss, terms, metrics and the per-rank non-finite flags stay
device tensors (`StepResult`) until the trainer's next log step reduces them in one collective, and its phase
timings are host clocks on the CPU (where every op is synchronous) and CUDA events only when the run profiles
(``train.profile_steps``); elsewhere they are not taken.

**Non-finite steps.** A step whose loss is NaN/inf on any rank must not update the weights on any rank.

* ZeRO 1-3: DeepSpeed's optimizers compute the global gradient norm for clipping in every step and skip the update
  (optimizer, Adam's step count, LR schedule) when it is not finite, the same decision on every rank since the
  norm is reduced over them; a non-finite loss makes non-finite gradients, so this is the guard, at no cost of
  mmssl's. The trainer reads the decision from ``engine.was_step_applied()`` (a host flag DeepSpeed already has).
* ZeRO 0: the engine has no such check, so mmssl makes one: one all-reduce of a per-rank flag once the loss is
  known, read on the host (one synchronisation per step, ZeRO-0 only). With ``grad_accum=1``, and under the
  gradient cache (where the loss of the whole accumulated batch is known before any backward), the step's
  backward passes and ``engine.step()`` are skipped on every rank. With naive accumulation, a micro-batch whose
  loss is non-finite on some rank is left out of the accumulated gradient on every rank (its backward skipped);
  the step applies the others.

Either way the step's batches are consumed and the step counter advances (checkpoint tags, ``train.steps``, the
stream position); the trainer counts skipped steps and aborts past ``train.max_nonfinite_steps`` in a row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mmssl.pretrain.accumulation import cached_accumulation_step

PHASES = ("data_wait", "forward", "backward", "optimizer")


@dataclass
class StepResult:
    loss: Tensor  # this rank's loss of the step (fp32, on the device)
    terms: dict[str, Tensor]  # per-objective terms (device)
    metrics: dict[str, Tensor]  # objectives' own scalar metrics (device)
    nonfinite: Tensor  # float [world]: 1 at this rank's entry when its loss was NaN/inf (device, not yet reduced)
    applied: bool  # the optimizer update happened on every rank
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase where timed


class PhaseTimer:
    """Seconds per phase of a step: host clocks on the CPU; on CUDA, events when ``profile`` (read at the end of
    the step, which then waits for the GPU) and nothing otherwise, so an unprofiled CUDA step never waits."""

    def __init__(self, device: torch.device, *, profile: bool) -> None:
        self.cuda = device.type == "cuda"
        self.enabled = not self.cuda or profile
        self.marks: list[tuple[str | None, Any]] = []

    def mark(self, phase: str | None) -> None:
        """Start ``phase`` (None: end the previous one)."""
        if not self.enabled:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((phase, event))
        else:
            self.marks.append((phase, time.perf_counter()))

    def collect(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.cuda and self.marks:
            self.marks[-1][1].synchronize()
        for (phase, start), (_, end) in zip(self.marks, self.marks[1:], strict=False):
            if phase is not None:
                elapsed = start.elapsed_time(end) / 1000.0 if self.cuda else end - start
                out[phase] = out.get(phase, 0.0) + elapsed
        self.marks.clear()
        return out


class NonFiniteGuard:
    """The per-rank non-finite flags of a step, and ZeRO-0's host check (see the module docstring)."""

    def __init__(self, engine: Any, *, rank: int, world: int, device: torch.device) -> None:
        self.engine, self.rank, self.world, self.device = engine, rank, world, device
        self.host_check = engine.zero_optimization_stage() == 0

    def flags(self, loss: Tensor) -> Tensor:
        flags = torch.zeros(self.world, device=self.device)
        flags[self.rank] = (~torch.isfinite(loss.detach().float())).float()
        return flags

    def finite_everywhere(self, loss: Tensor) -> bool:
        """One all-reduce of the flags, read on the host (ZeRO-0 only)."""
        flags = self.flags(loss)
        if self.world > 1:
            dist.all_reduce(flags)
        return not bool(flags.any())


def optimizer_step(engine: Any, fetch: Callable[[], Any], *, grad_accum: int, cached: bool,
                   guard: NonFiniteGuard, timer: PhaseTimer,
                   forward: Callable[[Any], Any] | None = None) -> StepResult:
    """One optimizer step over ``grad_accum`` micro-batches from ``fetch`` (which times its own waiting).

    ``forward(batch)`` returns the micro-batch's loss output (``.loss``, ``.terms``, ``.metrics``); the default is
    ``engine(batch)`` (a `PretrainTask`). Fine-tuning passes its classifier's cross-entropy. The gradient cache
    (``cached``) needs the default: it re-runs the task's towers itself."""
    forward = forward or engine
    skipped = False
    if grad_accum > 1 and cached:
        batches = [fetch() for _ in range(grad_accum)]
        decisions: list[bool] = []

        def proceed(result: Any) -> bool:
            decisions.append(guard.finite_everywhere(result.loss))
            return decisions[-1]

        timer.mark("forward")  # cache + loss + re-forward + backward, not split
        out = cached_accumulation_step(engine, batches, proceed=proceed if guard.host_check else None)
        timer.mark(None)
        loss = out.loss.detach().float()
        skipped = decisions == [False]
    else:
        loss = torch.zeros((), device=guard.device)
        for _ in range(grad_accum):
            batch = fetch()
            timer.mark("forward")
            out = forward(batch)
            loss = loss + out.loss.detach().float() / grad_accum
            if guard.host_check and not guard.finite_everywhere(out.loss):
                timer.mark(None)
                if grad_accum == 1:  # no backward, no engine.step(): optimizer, Adam and LR schedule stand still
                    skipped = True
                    break
                engine.step()  # the micro-step counts; its gradient is left out
                continue
            timer.mark("backward")
            engine.backward(out.loss)
            timer.mark("optimizer")
            engine.step()
            timer.mark(None)
    applied = not skipped and engine.was_step_applied()
    return StepResult(loss=loss, terms={k: v.detach().float() for k, v in out.terms.items()},
                      metrics={k: v.detach().float() for k, v in out.metrics.items() if v.numel() == 1},
                      nonfinite=guard.flags(loss), applied=applied, phases=timer.collect())

"""Run logging: per-step JSONL records, TensorBoard scalars, W&B, a progress bar, per-rank text logs, a loss curve.

Only rank 0 writes metrics (values are already reduced over ranks); every rank writes ``logs/rank<N>.log``.

**Sinks** (``train.report_to``, `metric_sinks`): ``metrics.jsonl`` is always written (``mmssl report``, the loss
curve, the benchmarks and the tests read it); ``tensorboard`` adds ``RUN/tensorboard/``; ``wandb`` logs the same
numeric records to a W&B run (the `wandb` package: ``pip install 'mmssl[wandb]'``) whose files W&B writes under
``RUN/wandb/`` (``train.wandb.mode: offline`` needs no network; ``wandb sync RUN/wandb/offline-run-*`` uploads it
later). The W&B run's config is the resolved recipe; its id is kept in ``RUN/wandb/mmssl-run-id`` so a resumed run
(``train.resume``) continues the same W&B run. Without ``report_to``, the older ``train.tensorboard`` switch
(default on) decides TensorBoard alone; giving both with different answers is an error.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import secrets
import string
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmssl.data_pipelines.shards import atomic_write_text
from mmssl.pretrain.recipe import RecipeError, TrainConfig, WandbConfig
from mmssl.pretrain.rundir import LOGS, LOSS_CURVE, METRICS, TENSORBOARD, WANDB, rank_log

SINKS = ("jsonl", "tensorboard", "wandb")
WANDB_MODES = ("online", "offline", "disabled")
WANDB_MISSING = ("train.report_to includes wandb, but the wandb package is not installed; install it with "
                 "pip install 'mmssl[wandb]' (or pip install wandb)")
WANDB_RUN_ID = "mmssl-run-id"


def metric_sinks(train: TrainConfig) -> tuple[str, ...]:
    """The run's metric sinks, in `SINKS` order: ``jsonl`` always, then what ``train.report_to`` lists (unset:
    ``tensorboard`` unless ``train.tensorboard`` is false)."""
    if train.report_to is None:
        return ("jsonl", "tensorboard") if train.tensorboard is not False else ("jsonl",)
    return ("jsonl", *(s for s in SINKS[1:] if s in train.report_to))


def check_reporting(train: TrainConfig) -> None:
    """Pre-launch checks of ``train.report_to`` / ``train.tensorboard`` / ``train.wandb``; a one-line error."""
    if train.report_to is not None:
        unknown = [s for s in train.report_to if s not in SINKS]
        if unknown:
            raise RecipeError(f"train.report_to: unknown sink {unknown[0]!r}; choose among {', '.join(SINKS)}")
        if train.tensorboard is not None and train.tensorboard != ("tensorboard" in train.report_to):
            raise RecipeError(f"train.tensorboard={str(train.tensorboard).lower()} disagrees with train.report_to="
                              f"{train.report_to}: report_to decides the metric sinks; set train.tensorboard=null "
                              f"(the older switch) or make them agree")
    if train.wandb.mode is not None and train.wandb.mode not in WANDB_MODES:
        raise RecipeError(f"train.wandb.mode must be one of {', '.join(WANDB_MODES)} (or unset), got "
                          f"{train.wandb.mode!r}")
    if "wandb" in metric_sinks(train) and importlib.util.find_spec("wandb") is None:
        raise RecipeError(WANDB_MISSING)


def hardware_summary(device_type: str) -> dict[str, Any]:
    """What the run's numbers depend on beyond the recipe: the CPU (model name and the vector ISA torch's kernels
    use, e.g. AVX2 vs AVX512: a different ISA rounds differently, so the same seed trains to different weights),
    the GPU if any, and the torch version."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if device_type == "cuda" else None, "torch": torch.__version__}


def setup_text_logs(run_dir: Path, rank: int) -> logging.Logger:
    logs = run_dir / LOGS
    logs.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("mmssl")
    root.setLevel(logging.INFO)
    for old in root.handlers:  # an earlier run in this process (its log file stays complete and is closed)
        old.close()
    root.handlers.clear()
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    file_handler = logging.FileHandler(rank_log(run_dir, rank))
    file_handler.setFormatter(fmt)
    root.addHandler(file_handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.addHandler(console)
    root.propagate = False
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return root


class MetricsWriter:
    """Rank 0's metric sinks (`metric_sinks`). ``write(step, record)`` appends to JSONL, TensorBoard and W&B;
    ``config``: the resolved recipe, the W&B run's config."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int,
                 sinks: Sequence[str] = ("jsonl", "tensorboard"), wandb: WandbConfig | None = None,
                 config: Mapping[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS
        self.tb = None
        self.wandb: Any = None
        self.bar = None
        if not enabled:
            return
        if self.path.exists():  # keep the steps the resumed checkpoint covers; drop what a killed run wrote after
            kept = []
            for line in self.path.read_text().splitlines() if start_step else []:
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by the kill
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        if "tensorboard" in sinks:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops events a killed run logged past the resumed step
            self.tb = SummaryWriter(str(run_dir / TENSORBOARD), purge_step=start_step + 1 if start_step else None)
        if "wandb" in sinks:
            self.wandb = start_wandb(run_dir, wandb or WandbConfig(), config or {}, resumed=start_step > 0)
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step", file=sys.stderr,
                        dynamic_ncols=True, mininterval=1.0)

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **record}) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def flush(self, steps_done: int, postfix: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.flush()
        if self.tb is not None:
            self.tb.flush()
        if self.bar is not None:
            self.bar.n = steps_done
            self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()},
                                 refresh=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()


def start_wandb(run_dir: Path, cfg: WandbConfig, config: Mapping[str, Any], *, resumed: bool) -> Any:
    """The W&B run of a pretraining run, its files under ``RUN/wandb/``; a resumed run reuses the recorded id."""
    try:
        import wandb
    except ImportError:
        raise RecipeError(WANDB_MISSING) from None
    directory = run_dir / WANDB
    directory.mkdir(parents=True, exist_ok=True)
    id_file = directory / WANDB_RUN_ID
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else ""
    if not run_id:
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        atomic_write_text(id_file, run_id + "\n")
    return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name, group=cfg.group,
                      tags=cfg.tags or None, mode=cfg.mode, dir=str(run_dir), id=run_id,
                      resume="allow" if resumed else None, config=dict(config),
                      settings=wandb.Settings(console="off"))  # the rank's own logs keep stdout / stderr


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(run_dir: Path) -> Path | None:
    """``loss_curve.png`` from ``metrics.jsonl``: the per-step loss and its running mean, and the LR."""
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    window = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - window + 1) : i + 1]) / len(loss[max(0, i - window + 1) : i + 1])
              for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, loss, alpha=0.35, label="loss (per step, mean over ranks)")
    ax.plot(steps, smooth, label=f"running mean ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    if "lr" in records[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in records], color="gray", lw=0.8, ls="--", label="lr")
        ax2.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    fig.tight_layout()
    out = run_dir / LOSS_CURVE
    fig.savefig(out)
    plt.close(fig)
    return out

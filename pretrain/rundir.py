"""Every name inside a run directory, in one place: what `mmssl pretrain` writes there and what the tools read.

    RUN/
        recipe.yaml            the resolved recipe (every default filled in)
        checkpoints/           `pretrain.checkpoint`: step_NNNNNNNN/ tags, latest
        metrics.jsonl          one record per step (rank 0)
        tensorboard/           the same as TensorBoard scalars (train.report_to: [tensorboard], train.tensorboard)
        wandb/                 W&B's run folders (train.report_to: [wandb]; offline-run-*/ to `wandb sync`), and
                               mmssl-run-id, the W&B run a resume continues (kept by --overwrite: W&B runs are
                               distinct, and an offline one may still await its upload)
        loss_curve.png         the loss over the steps (rank 0, at the end)
        summary.json           the run summary (rank 0, at the end)
        logs/rank<N>.log       each rank's text log;  logs/rank<N>.exit  its exit record (`pretrain.worker`)
        keys/rank<N>.jsonl     the sample keys each rank consumed (train.log_keys)
        export/                `mmssl export RUN` (default --out of the quickstart)
        eval/                  `mmssl evaluate RUN` results and plots
"""

from __future__ import annotations

from pathlib import Path

RECIPE = "recipe.yaml"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
WANDB = "wandb"
LOSS_CURVE = "loss_curve.png"
SUMMARY = "summary.json"
LOGS = "logs"
KEYS = "keys"
EXPORT = "export"
EVAL = "eval"
TRAINING_OUTPUTS = (CHECKPOINTS, METRICS, SUMMARY, TENSORBOARD, LOGS, KEYS, LOSS_CURVE)  # cleared by --overwrite


def rank_log(run_dir: Path, rank: int) -> Path:
    return run_dir / LOGS / f"rank{rank}.log"


def exit_record(run_dir: Path, rank: int) -> Path:
    return run_dir / LOGS / f"rank{rank}.exit"


def key_log(run_dir: Path, rank: int) -> Path:
    return run_dir / KEYS / f"rank{rank}.jsonl"

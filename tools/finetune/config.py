"""What one fine-tuning run is: `FinetuneConfig` (the options of ``mmssl finetune``), its checks, the names of the
files it writes, and reading it back (each rank loads the config the command wrote)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmssl.pretrain.precision import PRECISIONS
from mmssl.tools.errors import ToolError
from mmssl.tools.finetune.model import check_layer_decay, parse_freeze

CONFIG_FILE = "finetune_config.json"
RESULTS_FILE = "results.json"
CURVE_FILE = "finetune_curve.png"

@dataclass
class FinetuneConfig:
    """Everything one fine-tuning run needs (the CLI options of ``mmssl finetune``)."""

    encoder_dir: str
    shards: str
    label: str
    out_dir: str
    test_shards: str | None = None
    val_shards: str | None = None  # else a stratified val_fraction of the training shards
    val_fraction: float = 0.2
    epochs: int = 10
    batch_size: int = 32  # per rank
    lr: float = 1e-3  # the head's peak learning rate
    weight_decay: float = 0.05
    warmup_steps: int = 0
    layer_decay: float | None = None
    freeze: str | int = "none"  # "none" | "encoder" | k (train the last k layer groups + head)
    zero_stage: int = 2
    precision: str = "fp32"
    patience: int = 0  # stop after this many epochs without a better validation top-1 (0: never)
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 0  # intra-op threads per rank (0: cores / local ranks)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_config(cfg: FinetuneConfig) -> None:
    """Value checks that need no data (`ToolError` naming the CLI option)."""
    for key in ("epochs", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ToolError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    if cfg.lr <= 0:
        raise ToolError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.warmup_steps < 0 or cfg.patience < 0 or cfg.weight_decay < 0:
        raise ToolError("--warmup-steps, --patience and --weight-decay must be >= 0")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ToolError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ToolError(f"--zero-stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.precision not in PRECISIONS:
        raise ToolError(f"--precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    check_layer_decay(cfg.layer_decay)
    cfg.freeze = parse_freeze(cfg.freeze)


def load_config(path: str | Path) -> FinetuneConfig:
    return FinetuneConfig(**json.loads(Path(path).read_text()))

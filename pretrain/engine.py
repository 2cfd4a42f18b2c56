"""The DeepSpeed engine: its config from a recipe, torch AdamW with decay / no-decay groups, warmup + cosine LR.

Callers with their own parameter grouping (fine-tuning's layer-wise LR decay, `tools.finetune.model`) pass explicit
``groups`` to `build_engine`; a group's ``"lr"`` is its peak learning rate (``train.lr`` where absent) and the
schedule multiplies every group's peak by the same `lr_factor`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mmssl.pretrain.precision import check_precision, deepspeed_precision, prepare_for_precision
from mmssl.pretrain.recipe import RecipeError, TrainConfig


def lr_factor(step: int, train: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps`` to 1, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def check_train_config(train: TrainConfig) -> None:
    check_precision(train)
    if train.zero_stage not in (0, 1, 2, 3):
        raise RecipeError(f"train.zero_stage must be 0, 1, 2 or 3, got {train.zero_stage}")
    for key in ("steps", "grad_accum", "log_every", "keep_last"):
        if getattr(train, key) < 1:
            raise RecipeError(f"train.{key} must be >= 1, got {getattr(train, key)}")
    if train.accumulation not in ("cached", "naive"):
        raise RecipeError(f"train.accumulation must be 'cached' or 'naive', got {train.accumulation!r}")
    if train.warmup_steps < 0 or train.ckpt_every < 0:
        raise RecipeError("train.warmup_steps and train.ckpt_every must be >= 0")
    if train.lr <= 0:
        raise RecipeError(f"train.lr must be > 0, got {train.lr}")
    if len(train.betas) != 2:
        raise RecipeError(f"train.betas must hold two numbers, got {train.betas}")
    if train.max_nonfinite_steps < 0:
        raise RecipeError(f"train.max_nonfinite_steps must be >= 0, got {train.max_nonfinite_steps}")
    if not train.collective_timeout_s > 0:
        raise RecipeError(f"train.collective_timeout_s must be > 0 seconds, got {train.collective_timeout_s}")


# Bucket caps in elements: DeepSpeed's ZeRO tutorial values for reduce / all-gather buckets, DeepSpeed's defaults for
# ZeRO-3 prefetch and parameter persistence.
BUCKET_CAP = 200_000_000
PREFETCH_CAP = 50_000_000
PERSISTENCE_CAP = 100_000


def zero_config(stage: int, trainable: int, *, cuda: bool) -> dict[str, Any]:
    """``zero_optimization``: buckets no larger than the model (a bucket is allocated whole per backward: 2e8
    fp32 elements are 800 MB, which dominated a 3M-parameter model's step on CPU) and no larger than the caps;
    ``overlap_comm`` on CUDA (NCCL runs the reductions on their own stream while backward goes on), off on CPU
    (gloo blocks the calling thread, so overlapping only adds copies)."""
    bucket = int(min(BUCKET_CAP, max(1_000_000, trainable))) // 1024 * 1024  # a multiple of any alignment
    zero: dict[str, Any] = {"stage": stage}
    if stage in (1, 2):
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket, overlap_comm=cuda,
                    contiguous_gradients=True)
    elif stage == 3:
        zero.update(reduce_bucket_size=bucket, stage3_prefetch_bucket_size=min(bucket, PREFETCH_CAP),
                    stage3_param_persistence_threshold=min(PERSISTENCE_CAP, bucket), overlap_comm=cuda)
    return zero


def deepspeed_config(train: TrainConfig, micro_batch: int, world_size: int, trainable: int, *,
                     cuda: bool = False, node_local: bool = False) -> dict[str, Any]:
    """The engine config of a recipe's ``train`` section (precision keys: `pretrain.precision`); ``node_local``:
    the run directory is a copy per node (`pretrain.storage`), so every node writes the model-states file."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": micro_batch * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero_config(train.zero_stage, trainable, cuda=cuda),
        **deepspeed_precision(train),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"use_node_local_storage": node_local},
    }
    if train.profile_comms:  # DeepSpeed's comms logger times every deepspeed.comm collective (blocking it)
        config["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    return config


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norms, embeddings' positional/class tokens and the logit scale."""
    skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_engine(task: nn.Module, train: TrainConfig, micro_batch: int, world_size: int,
                 groups: list[dict[str, Any]] | None = None, *, node_local: bool = False) -> tuple[Any, Any, Any]:
    """``(engine, optimizer, scheduler)`` from ``deepspeed.initialize`` around ``task``. ``groups``: explicit AdamW
    parameter groups (default: `param_groups`, decay / no-decay at ``train.lr``); ``node_local``: see
    `deepspeed_config`."""
    import deepspeed

    if train.zero_stage == 3:  # parameters read outside their owner's forward must be gathered for the reader
        for module in task.modules():
            for param in getattr(module, "parameters_outside_forward", list)():
                deepspeed.zero.register_external_parameter(module, param)
    if train.precision != "fp32":
        prepare_for_precision(task)
    chosen = groups if groups is not None else param_groups(task, train.weight_decay)
    optimizer = torch.optim.AdamW(chosen, lr=train.lr, betas=tuple(train.betas), eps=train.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=task,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(train, micro_batch, world_size,
                                sum(p.numel() for p in task.parameters() if p.requires_grad),
                                cuda=torch.cuda.is_available(), node_local=node_local),
    )
    return engine, optimizer, scheduler

"""The DeepSpeed engine: its config from a recipe, torch AdamW with decay / no-decay groups, warmup + cosine LR.

``train.deepspeed`` hands DeepSpeed settings mmssl does not generate (optimizer-state offload, monitors, bucket
sizes, ...) to the engine: it is merged over the generated config key by key (nested mappings merge, anything else
replaces, `merge_deepspeed`). A key mmssl sets from the recipe (`OWNED`: batch sizes, accumulation, clipping,
precision, ZeRO stage, the optimizer and schedule, ...) may only be given the value mmssl sets; another value is a
one-line error naming the key, mmssl's value and the recipe key that controls it. Before launch the merged config
is also parsed by DeepSpeed's own ``DeepSpeedConfig`` (`check_deepspeed_passthrough`), so a misspelt key of a
section DeepSpeed validates (``zero_optimization``, ...) fails there, not on the ranks.

Callers with their own parameter grouping (fine-tuning's layer-wise LR decay, `tools.finetune.model`) pass explicit
``groups`` to `build_engine`; a group's ``"lr"`` is its peak learning rate (``train.lr`` where absent) and the
schedule multiplies every group's peak by the same `lr_factor`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from mmssl.pretrain.precision import (
    check_attention_kernel,
    check_precision,
    deepspeed_precision,
    prepare_for_precision,
)
from mmssl.pretrain.recipe import RecipeError, TrainConfig


def lr_factor(step: int, train: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps`` to 1, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# train.optimizer_impl -> torch AdamW's keywords. "fused": one kernel per parameter tensor for the whole update (on
# the CPU 3-4x faster than the loop over parameters, a tenth of a small model's step); "foreach": multi-tensor ops;
# "loop": one parameter at a time (torch's CPU default, open_clip's). The same update in another order of floating
# point operations: runs differ from each other by rounding, each is deterministic.
OPTIMIZER_IMPLS: dict[str, dict[str, bool]] = {"fused": {"fused": True}, "foreach": {"foreach": True},
                                               "loop": {"foreach": False}}


def check_train_config(train: TrainConfig) -> None:
    check_precision(train)
    check_attention_kernel(train)
    if train.optimizer_impl not in OPTIMIZER_IMPLS:
        raise RecipeError(f"train.optimizer_impl must be one of {list(OPTIMIZER_IMPLS)}, got {train.optimizer_impl!r}")
    if train.compile and train.zero_stage == 3:
        raise RecipeError("train.compile=true with train.zero_stage=3: ZeRO-3 gathers each parameter in module hooks "
                          "that a compiled tower would trace; use ZeRO 0-2 or train.compile=false")
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
    return merge_deepspeed(config, train.deepspeed)


# The DeepSpeed keys mmssl sets from the recipe (dotted path -> what controls it); train.deepspeed may repeat their
# value, not change it. A path given below one of these (bf16.enabled) or above it (zero_optimization: 3) counts.
OWNED = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "data.batch_size x ranks x train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "amp": "train.precision",
    "torch_autocast": "train.precision",
    "communication_data_type": "train.precision",
    "data_types": "train.precision",
    "optimizer": "train.lr, train.betas, train.eps and train.weight_decay (mmssl passes its own torch AdamW)",
    "scheduler": "train.warmup_steps, train.min_lr_ratio and train.steps (mmssl passes its own warmup + cosine)",
    "zero_allow_untested_optimizer": "mmssl's own torch AdamW, which ZeRO must allow",
    "checkpoint.use_node_local_storage": "the run directory's storage (shared or node-local, pretrain.storage)",
    "comms_logger": "train.profile_comms",
}
_UNSET = object()


def _leaves(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            yield from _leaves(value, path)  # an empty mapping merges nothing
        else:
            yield path, value


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return _UNSET
        tree = tree[key]
    return tree


def merge_deepspeed(generated: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` (``train.deepspeed``) over ``generated``: nested mappings merge key by key, anything else replaces;
    a key of `OWNED` set to another value than mmssl's is a `RecipeError` naming it."""
    for path, value in _leaves(extra):
        for owned, controller in OWNED.items():
            parts = tuple(owned.split("."))
            if path[: len(parts)] != parts and parts[: len(path)] != path:
                continue
            mine = _lookup(generated, path)
            if value != mine:
                dotted = ".".join(path)
                what = f"sets it to {mine!r} from" if mine is not _UNSET else "leaves it unset; it follows"
                raise RecipeError(f"train.deepspeed.{dotted}={value!r} conflicts with the DeepSpeed config mmssl "
                                  f"generates: mmssl {what} {controller}; change that instead (or drop "
                                  f"train.deepspeed.{dotted})")
    return _merge(generated, extra)


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def check_deepspeed_passthrough(train: TrainConfig, micro_batch: int, world_size: int) -> None:
    """Pre-launch: ``train.deepspeed`` conflicts (`merge_deepspeed`), an optimizer offload DeepSpeed would refuse for
    mmssl's torch AdamW, and the merged config parsed by DeepSpeed's ``DeepSpeedConfig``; one-line errors."""
    if not train.deepspeed:
        return
    config = deepspeed_config(train, micro_batch, world_size, trainable=0)
    offload = _lookup(config, ("zero_optimization", "offload_optimizer", "device"))
    if offload not in (_UNSET, None, "none") and config.get("zero_force_ds_cpu_optimizer", True) is not False:
        raise RecipeError(f"train.deepspeed.zero_optimization.offload_optimizer.device={offload!r} offloads mmssl's "
                          f"torch AdamW, which DeepSpeed refuses unless train.deepspeed.zero_force_ds_cpu_optimizer "
                          f"is false (it steps slower than DeepSpeed's own CPU Adam); set it to false")
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = {k: v for k, v in config.items() if k != "train_batch_size"}  # no process group: DeepSpeed sees 1 rank
    try:
        DeepSpeedConfig(parsed)
    except Exception as exc:  # pydantic's ValidationError, DeepSpeed's asserts: one line from whichever it is
        errors = getattr(exc, "errors", None)
        if callable(errors) and errors():  # pydantic: loc is relative to the section DeepSpeed parsed
            first = errors()[0]
            loc = [str(p) for p in first.get("loc", ())]
            given = [p for p, _ in _leaves(train.deepspeed) if loc and loc[0] in p]
            where = ".".join(given[0][: given[0].index(loc[0])] + tuple(loc)) if given else ".".join(loc)
            detail = f"{where}: {first.get('msg', '')}"
        else:
            detail = (str(exc) or type(exc).__name__).splitlines()[0]
        raise RecipeError(f"train.deepspeed: DeepSpeed rejects the merged config: {detail}") from None


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
    optimizer = torch.optim.AdamW(chosen, lr=train.lr, betas=tuple(train.betas), eps=train.eps,
                                  **OPTIMIZER_IMPLS[train.optimizer_impl])
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

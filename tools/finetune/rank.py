"""One fine-tuning rank: ``python -m mmssl.tools.finetune.rank --config OUT/finetune_config.json`` under torchrun.

Per epoch: the steps of `tools.finetune.data.epoch_order`, each one `pretrain.step.optimizer_step` on a DeepSpeed
engine (the pretraining loop's step: forward, ``engine.backward``, ``engine.step``, and its non-finite guard, so a
step whose loss is NaN/inf on any rank updates no rank and is counted), the epoch's mean train loss (over the steps
whose loss was finite) reduced over ranks; validation top-1 on all ranks (correct / total
counts summed); on a strict improvement the consolidated fp32 weights are written atomically; ``patience`` epochs
without one stop the run. The test top-1 is measured with the best weights reloaded from disk. The protocol is
described in `tools.finetune.command`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.architectures.encoder import Encoder, save_encoder
from mmssl.architectures.modalities import get_modality
from mmssl.data_pipelines.shards import atomic_write_text
from mmssl.objectives.base import LossOutput
from mmssl.pretrain.distributed import init_distributed, seed_everything, set_threads
from mmssl.pretrain.engine import build_engine
from mmssl.pretrain.recipe import TrainConfig
from mmssl.pretrain.runlog import setup_text_logs
from mmssl.pretrain.step import NonFiniteGuard, PhaseTimer, optimizer_step
from mmssl.pretrain.worker import run_and_teardown
from mmssl.tools.finetune.config import CURVE_FILE, RESULTS_FILE, FinetuneConfig, load_config
from mmssl.tools.finetune.data import EvalCache, decode_batch, epoch_order, load_splits, rank_rows, steps_per_epoch
from mmssl.tools.finetune.model import (
    WEIGHTS_FILE,
    Classifier,
    apply_freeze,
    finetune_param_groups,
    frozen_fp32_copy,
    full_fp32_state,
    load_classifier,
    save_weights_atomic,
    set_train_mode,
    write_classifier_info,
)

ENCODER_SUBDIR = "encoder"
BETAS = (0.9, 0.999)  # AdamW as in BEiT / MAE fine-tuning
EPS = 1e-8


def plot_curve(results: dict[str, Any], path: Path) -> Path:
    """Train loss and validation top-1 against the epoch (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] for e in results["epochs"]]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(epochs, [e["train_loss"] for e in results["epochs"]], marker="o", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss (mean over the epoch)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(epochs, [100 * e["val_top1"] for e in results["epochs"]], marker="s", color="tab:orange",
             label="val top-1")
    ax2.set_ylabel("validation top-1 (%)")
    if results.get("best_epoch"):
        ax2.axvline(results["best_epoch"], color="gray", ls="--", lw=0.8)
    ax.set_title(f"fine-tuning on '{results['config']['label']}'")
    handles, labels = ax.get_legend_handles_labels()
    handles2, labels2 = ax2.get_legend_handles_labels()
    ax.legend(handles + handles2, labels + labels2, loc="center right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def train_config(cfg: FinetuneConfig, total_steps: int) -> TrainConfig:
    """The engine's optimisation settings: warmup + cosine to 0 over every step of every epoch."""
    return TrainConfig(steps=total_steps, lr=cfg.lr, min_lr_ratio=0.0, warmup_steps=cfg.warmup_steps,
                       weight_decay=cfg.weight_decay, betas=list(BETAS), eps=EPS, grad_clip=cfg.grad_clip,
                       zero_stage=cfg.zero_stage, precision=cfg.precision, seed=cfg.seed)


@torch.no_grad()
def top1(model: nn.Module, cache: EvalCache, targets: Tensor, *, batch_size: int, rank: int, world: int,
         device: torch.device, dtype: torch.dtype | None) -> float:
    """Top-1 over the whole split: this rank's share ``r::world`` in equal batch counts, counts summed."""
    counts = torch.zeros(2, dtype=torch.float64)
    for batch, rows, real in cache.batches(batch_size, rank, world):
        batch = batch.to(device, float_dtype=dtype)
        pred = model(batch.inputs[cache.modality]).float().argmax(-1).cpu()
        counts += torch.stack([((pred == targets[rows]) & real).sum(), real.sum()]).double()
    if dist.is_initialized():
        dist.all_reduce(counts)
    return float(counts[0] / counts[1])


def train_epoch(engine: Any, batches: Iterator[tuple[Any, Tensor]], steps: int,
                guard: NonFiniteGuard) -> dict[str, Any]:
    """``steps`` steps of the pretraining loop's `optimizer_step` with the classifier's cross-entropy
    ``-(1/B) Σ_i log softmax(logits_i)[y_i]``; returns the mean finite train loss over ranks, the head's learning
    rate of the last step and the number of steps whose loss was NaN/inf (no update on any rank)."""
    timer = PhaseTimer(guard.device, profile=False)

    def classify(batch: tuple[Any, Tensor]) -> LossOutput:
        inputs, targets = batch
        loss = F.cross_entropy(engine(inputs).float(), targets)
        return LossOutput(loss=loss, terms={"ce": loss.detach()}, metrics={})

    loss_sum = torch.zeros(2, device=guard.device)  # finite losses summed, their count
    lr_used, skipped = 0.0, 0
    for _ in range(steps):
        lr_used = max(float(g["lr"]) for g in engine.optimizer.param_groups)  # the head's, this step
        result = optimizer_step(engine, batches.__next__, grad_accum=1, cached=False, guard=guard, timer=timer,
                                forward=classify)
        finite = torch.isfinite(result.loss)
        loss_sum += torch.stack([torch.where(finite, result.loss, 0.0), finite.float()])
        skipped += not result.applied
    dist.all_reduce(loss_sum)
    return {"train_loss": float(loss_sum[0] / loss_sum[1].clamp_min(1)), "lr": lr_used, "nonfinite_steps": skipped}


def fit(cfg: FinetuneConfig) -> dict[str, Any] | None:
    """Fine-tune as one rank of the current process group; rank 0 returns (and writes) the results."""
    rank, world, device = init_distributed()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = setup_text_logs(out, rank)
    set_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    encoder = Encoder.from_dir(cfg.encoder_dir)
    modality = encoder.modality
    splits = load_splits(cfg, encoder)
    seed_everything(cfg.seed)
    model = Classifier(encoder.tower, len(splits.classes))
    trainable = apply_freeze(model, cfg.freeze)
    global_batch = cfg.batch_size * world
    n_train = len(splits.train)
    steps = steps_per_epoch(n_train, global_batch)
    groups = finetune_param_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay)
    frozen = frozen_fp32_copy(model) if cfg.precision == "bf16" else None
    engine, _, _ = build_engine(model, train_config(cfg, steps * cfg.epochs), cfg.batch_size, world, groups=groups)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    train_decoder = get_modality(modality).decoder(encoder.cfg, train=True)
    y_train, y_val = splits.targets(splits.train), splits.targets(splits.val)
    val_cache = EvalCache(splits.val, modality, encoder.decoder(), cfg.seed)
    evaluate = {"batch_size": cfg.batch_size, "rank": rank, "world": world, "device": device, "dtype": dtype}
    if rank == 0:
        write_classifier_info(out, {"encoder_dir": str(Path(cfg.encoder_dir).resolve()), "modality": modality,
                                    "label": cfg.label, "classes": splits.classes})
        log.info("fine-tuning %s on %r: %d classes, %d train / %d val, %d rank(s) x %d, %d steps per epoch, "
                 "ZeRO-%d, %s, %d trainable parameters", cfg.encoder_dir, cfg.label, len(splits.classes), n_train,
                 len(splits.val), world, cfg.batch_size, steps, cfg.zero_stage, cfg.precision, trainable)
    records: list[dict[str, Any]] = []
    best, best_epoch, since_best, stopped_early = -1.0, 0, 0, False
    guard = NonFiniteGuard(engine, rank=rank, world=world, device=device)

    def epoch_batches(epoch: int) -> Iterator[tuple[Any, Tensor]]:
        """This rank's ``(inputs, targets)`` for every step of ``epoch``, on the device."""
        order = epoch_order(n_train, global_batch, epoch, cfg.seed)
        for step in range(steps):
            rows = rank_rows(order, step, cfg.batch_size, rank, world)
            batch = decode_batch(splits.train, rows, modality, train_decoder, seed=cfg.seed, epoch=epoch)
            yield batch.to(device, float_dtype=dtype).inputs[modality], y_train[rows].to(device)

    for epoch in range(1, cfg.epochs + 1):
        set_train_mode(engine, True)
        trained = train_epoch(engine, epoch_batches(epoch), steps, guard)
        set_train_mode(engine, False)
        val = top1(engine, val_cache, y_val, **evaluate)
        records.append({"epoch": epoch, **trained, "val_top1": val})
        if val > best:
            best, best_epoch, since_best = val, epoch, 0
            state = full_fp32_state(engine.module, frozen)  # collective: every rank
            if rank == 0:
                save_weights_atomic(state, out / WEIGHTS_FILE)
        else:
            since_best += 1
        if rank == 0:
            log.info("epoch %d: train loss %.4f, val top-1 %.4f%s%s", epoch, records[-1]["train_loss"], val,
                     " (best)" if best_epoch == epoch else "",
                     f"; {trained['nonfinite_steps']} step(s) had a NaN/inf loss and updated nothing"
                     if trained["nonfinite_steps"] else "")
        if cfg.patience and since_best >= cfg.patience and epoch < cfg.epochs:
            stopped_early = True
            break
    dist.barrier()  # the best weights are on disk
    best_model, _ = load_classifier(out)
    best_model = best_model.to(device=device, dtype=dtype or torch.float32)
    test_top1 = None
    if splits.test is not None:
        test_cache = EvalCache(splits.test, modality, encoder.decoder(), cfg.seed)
        test_top1 = top1(best_model, test_cache, splits.targets(splits.test), **evaluate)
    if rank != 0:
        return None
    best_model = best_model.float()
    save_encoder(out / ENCODER_SUBDIR, modality, encoder.cfg, best_model.tower, encoder.head, encoder.embed_dim)
    data_errors: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for split in (s for s in (splits.train, splits.val, splits.test) if s is not None):
        data_errors.update(split.data_errors)
        skipped.update(split.skipped)
    results = {
        "config": cfg.to_dict(),
        "world_size": world,
        "global_batch": global_batch,
        "steps_per_epoch": steps,
        "padded_per_epoch": steps * global_batch - n_train,
        "n_train": n_train,
        "n_val": len(splits.val),
        "n_test": len(splits.test) if splits.test is not None else 0,
        "classes": splits.classes,
        "trainable_parameters": trainable,
        "total_parameters": sum(p.numel() for p in best_model.parameters()),
        "epochs": records,
        "best_epoch": best_epoch,
        "best_val_top1": best,
        "stopped_early": stopped_early,
        "test_top1": test_top1,
        "data_errors": dict(data_errors),
        "skipped_samples": dict(skipped),
        "weights": str(out / WEIGHTS_FILE),
        "encoder": str(out / ENCODER_SUBDIR),
    }
    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    plot_curve(results, out / CURVE_FILE)
    log.info("done: best epoch %d (val top-1 %.4f), test top-1 %s", best_epoch, best, test_top1)
    return results


def run_rank(cfg: FinetuneConfig) -> int:
    """`fit`, then a clean teardown; user errors become one ``mmssl: error:`` line and exit code 2."""
    from mmssl.tools.cli import user_errors

    return run_and_teardown(lambda: fit(cfg), user_errors())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmssl.tools.finetune.rank")
    parser.add_argument("--config", required=True, help="finetune_config.json written by `launch_finetune`")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    code = run_rank(load_config(args.config))
    os._exit(code)  # gloo can abort in its teardown after the work is done (see pretrain.worker)


if __name__ == "__main__":
    main()

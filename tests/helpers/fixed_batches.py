"""Run the real trainer with fixed global batches split across however many ranks are launched.

    torchrun --nproc_per_node=N tests/helpers/fixed_batches.py RECIPE RUN_DIR GLOBAL_BATCH OUT_FEATURES [...]

(several groups of those four arguments: the runs happen one after another on the same ranks).

Global batch ``i`` is samples ``i·G .. (i+1)·G-1`` of the training shards read in order; rank ``r`` of ``W``
trains on rows ``r·G/W .. (r+1)·G/W - 1`` of it, in ``k = train.grad_accum`` micro-batches of ``G/(W·k)`` rows.
So 1 rank and 2 ranks, with or without accumulation, see the same global batches, which is what the equivalence
tests need. Afterwards rank 0 saves the live model's pooled features and embeddings for the first global batch
(evaluation mode; every rank runs that forward, as ZeRO-3 needs) so that the export test can compare against the
training model itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from mmssl.data_pipelines.shards import resolve_shards
from mmssl.data_pipelines.stream import read_once
from mmssl.pretrain.data import eval_decoders, modality_fields
from mmssl.pretrain.distributed import init_distributed
from mmssl.pretrain.launch import prepare_run_dir
from mmssl.pretrain.recipe import load_recipe
from mmssl.pretrain.trainer import Trainer


def train_fixed(recipe_path: str, run_dir: Path, global_batch: int, out_file: str) -> None:
    recipe = load_recipe(recipe_path)
    rank, world, _ = init_distributed()
    accum = recipe.train.grad_accum
    recipe.data.batch_size = global_batch // (world * accum)
    decoders = eval_decoders(recipe)

    def global_batches():
        return read_once(resolve_shards(recipe.data.train), fields=modality_fields(recipe), decoders=decoders,
                         batch_size=global_batch)

    def source(rank: int, world: int, start: int):
        per_rank, micro = global_batch // world, global_batch // (world * accum)
        for batch in global_batches():
            for j in range(accum):
                index = batch.index * accum + j
                if index >= start:
                    part = batch.rows(rank * per_rank + j * micro, rank * per_rank + (j + 1) * micro)
                    part.index = index
                    yield part

    if rank == 0:
        prepare_run_dir(run_dir, recipe, overwrite=True)
    dist.barrier()
    trainer = Trainer(recipe, run_dir, batches=source)
    trainer.fit()
    model = trainer.model.eval()  # every rank runs the forward: under ZeRO-3 it gathers weights collectively
    first = next(global_batches())
    with torch.no_grad():
        out = model(first.inputs, first.present)
    if rank == 0:
        tensors = {f"{kind}.{m}": getattr(out, kind)[m].contiguous() for kind in ("pooled", "embeddings")
                   for m in out.embeddings}
        save_file(tensors, out_file)
    dist.barrier()


def main() -> None:
    args = sys.argv[1:]
    if not args or len(args) % 4:
        raise SystemExit(f"usage: {sys.argv[0]} RECIPE RUN_DIR GLOBAL_BATCH OUT_FEATURES [...]; got {args}")
    for i in range(0, len(args), 4):
        train_fixed(args[i], Path(args[i + 1]), int(args[i + 2]), args[i + 3])
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

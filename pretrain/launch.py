"""``mmssl pretrain``: validate a recipe, prepare the run directory, and start the ranks.

Launch modes:

* ``mmssl pretrain RECIPE --nproc N``: validates in this process, then starts N local ranks with
  ``torch.distributed.run --standalone`` (torchrun), each running `run_rank`.
* Under an external launcher (``torchrun --nnodes ...``, ``deepspeed --hostfile ...``; detected by ``WORLD_SIZE``
  in the environment): this process *is* a rank and trains directly. The run directory must then be on storage
  every node sees (or pass ``--run-dir`` per node to a local disk, and collect checkpoints yourself).

Without a GPU, ranks use gloo and ``DS_ACCELERATOR=cpu``; with GPUs, NCCL.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from pretrain.recipe import Recipe, RecipeError, dump_recipe, load_recipe
from pretrain.validate import validate_recipe

RECIPE_FILE = "recipe.yaml"
RUN_ARTIFACTS = ("checkpoints", "metrics.jsonl", "summary.json", "tensorboard", "logs", "keys", "loss_curve.png")


def under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def prepare_run_dir(run_dir: Path, recipe: Recipe, *, overwrite: bool) -> None:
    """Refuse to clobber a run with checkpoints unless resuming or ``overwrite``; write the resolved recipe."""
    has_checkpoints = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    if has_checkpoints and not recipe.train.resume and not overwrite:
        raise RecipeError(f"run directory {run_dir} already has checkpoints; continue it with train.resume=latest "
                          f"or start over with --overwrite")
    if overwrite and not recipe.train.resume:
        for name in RUN_ARTIFACTS:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RECIPE_FILE}.tmp"
    tmp.write_text(dump_recipe(recipe))
    os.replace(tmp, run_dir / RECIPE_FILE)


def child_env(nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def launch(source: str, overrides: Sequence[str], *, nproc: int, run_dir: str | None, overwrite: bool) -> int:
    """Validate, then train on ``nproc`` local ranks (or as one rank of an external launcher). Returns the exit
    code of the ranks."""
    recipe = load_recipe(source, overrides)
    world = int(os.environ["WORLD_SIZE"]) if under_launcher() else nproc
    if world < 1:
        raise RecipeError(f"--nproc must be >= 1, got {nproc}")
    validate_recipe(recipe, world_size=world)
    directory = Path(run_dir) if run_dir else default_run_dir(recipe)
    if under_launcher():
        from pretrain.worker import run_rank

        return run_rank(source, overrides, directory, overwrite=overwrite)
    prepare_run_dir(directory, recipe, overwrite=overwrite)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pretrain.worker", "--prepared", "--run-dir", str(directory), str(source), *overrides]
    print(f"mmssl: pretraining {recipe.name} on {nproc} rank(s) -> {directory}", file=sys.stderr, flush=True)
    code = subprocess.call(cmd, env=child_env(nproc))
    if code != 0:
        print(f"mmssl: error: pretraining failed (exit code {code}); see {directory / 'logs'}", file=sys.stderr)
    return code

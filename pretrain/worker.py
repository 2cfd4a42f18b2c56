"""One training rank: ``python -m pretrain.worker --run-dir DIR RECIPE [overrides...]`` under any launcher."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def _user_errors() -> tuple[type[Exception], ...]:
    from architectures.towers import ArchitectureError
    from data_pipelines.shards import DataError
    from objectives.base import ObjectiveError
    from pretrain.checkpoint import CheckpointError
    from pretrain.recipe import RecipeError

    return RecipeError, DataError, ArchitectureError, ObjectiveError, CheckpointError


def run_rank(source: str, overrides: Sequence[str], run_dir: Path, *, overwrite: bool = False,
             prepared: bool = False) -> int:
    """Parse the recipe, prepare the run directory on rank 0 (unless the parent did), train, tear down cleanly."""
    import torch.distributed as dist

    from pretrain.launch import prepare_run_dir
    from pretrain.recipe import load_recipe
    from pretrain.trainer import init_distributed, train

    def work() -> None:
        recipe = load_recipe(source, overrides)
        rank, _, _ = init_distributed(recipe.train.collective_timeout_s)
        if rank == 0 and not prepared:
            prepare_run_dir(run_dir, recipe, overwrite=overwrite)
        dist.barrier()
        train(recipe, run_dir)

    return run_and_teardown(work, _user_errors())


def run_and_teardown(work: Callable[[], None], user_errors: tuple[type[Exception], ...]) -> int:
    """Run one rank's ``work``; a user error becomes one ``mmssl: error:`` line (and the rank's log) and exit code
    2; then a barrier (on success) and the process group's teardown. Returns the exit code."""
    import torch.distributed as dist

    code = 0
    try:
        work()
    except user_errors as exc:
        logging.getLogger("mmssl").error("%s", exc)
        print(f"mmssl: error: {exc}", file=sys.stderr, flush=True)
        code = 2
    if code == 0 and dist.is_initialized():
        dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.worker")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--prepared", action="store_true", help="the launcher already prepared --run-dir")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    code = run_rank(args.recipe, args.overrides, Path(args.run_dir), overwrite=args.overwrite, prepared=args.prepared)
    # gloo can abort in its teardown after training finished; leave without running it (environment notes).
    os._exit(code)


if __name__ == "__main__":
    main()

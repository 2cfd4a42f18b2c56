"""One training rank: ``python -m mmssl.pretrain.worker --run-dir DIR RECIPE [overrides...]`` under any launcher.

When a rank's work ends (trained, or failed with a user error or an exception) it writes its **exit record**
``<run>/logs/rank<N>.exit`` atomically: ``{"rank": N, "exit_code": 0|1|2, "error": null|"one line"}``. A rank that
has no record after the job ended never got there: it was killed (a signal, the kernel's OOM killer) or stopped by
the launcher after another rank failed. `pretrain.launch` reads the records to name the rank that ended a job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmssl.pretrain.errors import user_errors
from mmssl.pretrain.rundir import exit_record


def exit_record_path(run_dir: Path, rank: int) -> Path:
    return exit_record(run_dir, rank)


def write_exit_record(path: Path, rank: int, exit_code: int, error: str | None) -> None:
    """Write the exit record atomically (temp file + rename): a reader never sees half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps({"rank": rank, "exit_code": exit_code, "error": error}) + "\n")
    os.replace(tmp, path)


def read_exit_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or None when there is none (or it is unreadable: treated as absent)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def train_job(source: str, overrides: Sequence[str], run_dir: Path, *, prepare: bool = True,
              overwrite: bool = False, validate: bool = False) -> None:
    """One pretraining job on the current process group (created if there is none, and kept): parse the recipe;
    on rank 0 validate it (``validate``: what the launcher does before it starts the ranks); find the run
    directory's layout across nodes (`pretrain.storage`) and prepare each copy of it (``prepare``: the finaliser of
    each copy, so node-local run directories get their recipe too); then train on every rank."""
    import torch.distributed as dist

    from mmssl.pretrain.distributed import init_distributed
    from mmssl.pretrain.launch import prepare_run_dir
    from mmssl.pretrain.recipe import load_recipe
    from mmssl.pretrain.storage import probe_storage
    from mmssl.pretrain.trainer import train
    from mmssl.pretrain.validate import validate_recipe

    recipe = load_recipe(source, overrides)
    rank, world, _ = init_distributed(recipe.train.collective_timeout_s)
    if rank == 0 and validate:
        validate_recipe(recipe, world_size=world)
    storage = probe_storage(run_dir)
    if storage.finaliser and prepare:
        prepare_run_dir(run_dir, recipe, overwrite=overwrite)
    dist.barrier()
    train(recipe, run_dir, storage=storage)


def run_rank(source: str, overrides: Sequence[str], run_dir: Path, *, overwrite: bool = False,
             prepared: bool = False) -> int:
    """`train_job` (preparing the run directory on rank 0 unless the parent did), then tear down cleanly."""
    record = exit_record_path(run_dir, int(os.environ.get("RANK", "0")))
    record.unlink(missing_ok=True)  # a previous run's record in a resumed run directory
    return run_and_teardown(lambda: train_job(source, overrides, run_dir, prepare=not prepared, overwrite=overwrite),
                            user_errors(), exit_record=record)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def run_and_teardown(work: Callable[[], None], expected: tuple[type[Exception], ...], *,
                     exit_record: Path | None = None) -> int:
    """Run one rank's ``work``; a user error (one of ``expected``) becomes one ``mmssl: error:`` line (and the
    rank's log) and exit code 2; then a barrier (on success) and the process group's teardown. Returns the exit
    code. ``exit_record``: where to write this rank's exit record (see the module docstring) as soon as ``work``
    ends; an unexpected exception is recorded (exit code 1, its type and first line) and then propagates."""
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    code = 0
    try:
        work()
    except expected as exc:
        logging.getLogger("mmssl").error("%s", exc)
        print(f"mmssl: error: {exc}", file=sys.stderr, flush=True)
        code = 2
        if exit_record is not None:
            write_exit_record(exit_record, rank, code, _one_line(exc))
    except BaseException as exc:
        if exit_record is not None:
            write_exit_record(exit_record, rank, 1, f"{type(exc).__name__}: {_one_line(exc)}")
        raise
    else:
        if exit_record is not None:
            write_exit_record(exit_record, rank, code, None)
    if code == 0 and dist.is_initialized():
        dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmssl.pretrain.worker")
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

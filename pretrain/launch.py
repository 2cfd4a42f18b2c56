"""``mmssl pretrain``: validate a recipe, prepare the run directory, and start the ranks.

Launch modes:

* ``mmssl pretrain RECIPE --nproc N``: validates in this process, then starts N local ranks with
  ``torch.distributed.run --standalone`` (torchrun), each running `run_rank`.
* Under an external launcher (``torchrun --nnodes ...``, ``deepspeed --hostfile ...``; detected by ``WORLD_SIZE``
  in the environment): this process *is* a rank and trains directly. The run directory must then be on storage
  every node sees (or pass ``--run-dir`` per node to a local disk, and collect checkpoints yourself).

Without a GPU, ranks use gloo and ``DS_ACCELERATOR=cpu``; with GPUs, NCCL.

When the local ranks fail, the launcher's error line names the rank(s) that ended the job and how: torchrun's
elastic agent runs in this process (``torch.distributed.run.run``), so its `ChildFailedError` gives each failed
rank's exit code or signal, and each rank's exit record (`pretrain.worker`, ``logs/rank<N>.exit``) gives the error
it ended with::

    mmssl: error: pretraining failed: rank 1 was killed by signal SIGKILL (exit -9); see RUN/logs/rank1.log
    mmssl: error: pretraining failed: rank 0 failed (exit 2): data.train: ...; see RUN/logs/rank0.log

A rank with neither (the agent could not say, or its node's logs are not on this disk) is reported as having
"no exit record" rather than assumed killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmssl.pretrain.recipe import Recipe, RecipeError, dump_recipe, load_recipe
from mmssl.pretrain.rundir import CHECKPOINTS, LOGS, RECIPE, TRAINING_OUTPUTS, rank_log
from mmssl.pretrain.validate import validate_recipe
from mmssl.pretrain.worker import exit_record_path, read_exit_record

MAX_QUOTED = 300  # characters of a rank's error quoted in the launcher's line


def under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def prepare_run_dir(run_dir: Path, recipe: Recipe, *, overwrite: bool) -> None:
    """Refuse to clobber a run with checkpoints unless resuming or ``overwrite``; write the resolved recipe."""
    has_checkpoints = (run_dir / CHECKPOINTS).is_dir() and any((run_dir / CHECKPOINTS).iterdir())
    if has_checkpoints and not recipe.train.resume and not overwrite:
        raise RecipeError(f"run directory {run_dir} already has checkpoints; continue it with train.resume=latest "
                          f"or start over with --overwrite")
    if overwrite and not recipe.train.resume:
        for name in TRAINING_OUTPUTS:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RECIPE}.tmp"
    tmp.write_text(dump_recipe(recipe))
    os.replace(tmp, run_dir / RECIPE)


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
        from mmssl.pretrain.worker import run_rank

        return run_rank(source, overrides, directory, overwrite=overwrite)
    prepare_run_dir(directory, recipe, overwrite=overwrite)
    for rank in range(nproc):  # records of an earlier run in this directory must not speak for this one
        exit_record_path(directory, rank).unlink(missing_ok=True)
    args = ["--standalone", f"--nproc_per_node={nproc}", "-m", "mmssl.pretrain.worker", "--prepared", "--run-dir",
            str(directory), str(source), *overrides]
    print(f"mmssl: pretraining {recipe.name} on {nproc} rank(s) -> {directory}", file=sys.stderr, flush=True)
    failures = run_torchrun(args, child_env(nproc))
    if failures is None:
        return 0
    print(f"mmssl: error: pretraining failed: {describe_failures(directory, failures, nproc)}", file=sys.stderr,
          flush=True)
    return failure_exit_code(directory, failures)


def run_torchrun(args: Sequence[str], env: Mapping[str, str]) -> dict[int, Any] | None:
    """Run torchrun (``torch.distributed.run``) with ``args`` in this process, the ranks getting ``env``. Returns
    None when every rank succeeded, else the agent's failures (global rank -> `ProcessFailure`; empty when the agent
    itself failed, which is reported on stderr)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        run(parse_args(list(args)))
    except ChildFailedError as exc:
        return dict(exc.failures)
    except Exception as exc:  # rendezvous or start-up failure of the agent: no rank to blame
        print(f"mmssl: torchrun failed before the ranks ended: {type(exc).__name__}: {exc}", file=sys.stderr)
        return {}
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return None


def _failure_order(exitcode: int | None, record: dict[str, Any] | None) -> int:
    """Likely causes first: a rank killed by a signal (its peers' collectives then fail with connection errors),
    then a user error (exit 2), then other recorded exceptions, then the rest; last, ranks ended by SIGTERM, the
    signal torchrun's agent sends the surviving ranks once one has failed (a consequence, not a cause)."""
    if exitcode is not None and exitcode < 0 and not (record and record.get("exit_code")):
        return 4 if -exitcode == signal.SIGTERM else 0
    if record and record.get("exit_code"):
        return 1 if record["exit_code"] == 2 else 2
    return 3


def describe_failures(run_dir: Path, failures: Mapping[int, Any], nproc: int) -> str:
    """One line naming each failed rank and how it ended (see the module docstring), likely causes first; ranks
    that ended the same way are named together. ``failures``: global rank -> an object with ``exitcode``
    (negative: killed by that signal) and ``signal_name()`` (torch's `ProcessFailure`); empty: judge from the exit
    records of ranks ``0..nproc-1``."""
    ranks = list(failures)
    if not ranks:  # no word from the agent: ranks that recorded an error, else every rank without a record
        records = {r: read_exit_record(exit_record_path(run_dir, r)) for r in range(nproc)}
        ranks = [r for r, rec in records.items() if rec and rec.get("exit_code")] or \
                [r for r, rec in records.items() if rec is None]
    groups: dict[tuple[int, str], list[int]] = {}
    for rank in sorted(ranks):
        record = read_exit_record(exit_record_path(run_dir, rank))
        exitcode = getattr(failures.get(rank), "exitcode", None)
        if record is not None and record.get("exit_code"):
            error = str(record.get("error"))
            error = error if len(error) <= MAX_QUOTED else error[:MAX_QUOTED] + "..."
            how = f"failed (exit {record['exit_code']}): {error}"
        elif exitcode is not None and exitcode < 0:
            how = f"was killed by signal {failures[rank].signal_name()} (exit {exitcode})"
        elif exitcode is not None:
            how = f"exited with code {exitcode} and no exit record"
        else:
            how = "left no exit record"
        groups.setdefault((_failure_order(exitcode, record), how), []).append(rank)
    parts = []
    for (_, how), members in sorted(groups.items(), key=lambda item: (item[0][0], item[1][0])):
        if len(members) == 1:
            parts.append(f"rank {members[0]} {how}; see {rank_log(run_dir, members[0])}")
        else:
            parts.append(f"ranks {', '.join(map(str, members))} {how}; see {run_dir / LOGS}")
    return "; ".join(parts) if parts else f"no rank left an error (see {run_dir / LOGS})"


def failure_exit_code(run_dir: Path, failures: Mapping[int, Any]) -> int:
    """2 (the CLI's code for bad input) when every failed rank recorded a user error, else 1 (as torchrun)."""
    records = [read_exit_record(exit_record_path(run_dir, rank)) for rank in failures]
    return 2 if records and all(rec and rec.get("exit_code") == 2 for rec in records) else 1

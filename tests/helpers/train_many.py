"""Train several recipes one after another on the same ranks, so a test module pays torchrun's start-up (Python,
torch, timm, DeepSpeed imports: most of a few-step run) once instead of once per recipe.

Each job is `pretrain.worker.train_job`, what every rank of ``mmssl pretrain RECIPE --run-dir DIR --overwrite
OVERRIDES`` runs, with the launcher's `validate_recipe` done on rank 0 (recipe -> model -> DeepSpeed engine -> real
shard loader -> `Trainer`). The launcher's
own path (torchrun in-process, exit records, failure lines) is tested by `mmssl pretrain` runs elsewhere.

    run_jobs([Job("clip-tiny", [...], run_dir), ...], nproc=2)  # -> {run_dir: None (trained) | "error text"}

A job that fails writes ``<run_dir>/job_error.txt`` and stops the ranks (a failed rank cannot be trusted to be in
step with its peers); the jobs after it are reported as not run.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

JOB_ERROR = "job_error.txt"


@dataclass(frozen=True)
class Job:
    source: str  # a bundled recipe name or a YAML path
    overrides: list[str] = field(default_factory=list)
    run_dir: str = ""


def run_jobs(jobs: list[Job], *, nproc: int = 2, timeout: int = 900) -> dict[str, str | None]:
    """Run ``jobs`` in order on ``nproc`` gloo ranks; returns run_dir -> None when the job trained, else why not."""
    from tests.conftest import run_ranks

    for job in jobs:
        (Path(job.run_dir) / JOB_ERROR).unlink(missing_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([asdict(job) for job in jobs], f)
    try:
        proc = run_ranks(nproc, ["-m", "tests.helpers.train_many", f.name], timeout=timeout)
    finally:
        os.unlink(f.name)
    results: dict[str, str | None] = {}
    failed = None
    for job in jobs:
        error = Path(job.run_dir) / JOB_ERROR
        if error.exists():
            failed = failed or job.source
            results[job.run_dir] = error.read_text()
        elif failed is not None or not (Path(job.run_dir) / "summary.json").exists():
            results[job.run_dir] = (f"not run (an earlier job, {failed}, failed)" if failed else "did not finish") + \
                f"; torchrun exit {proc.returncode}:\n{proc.stderr[-3000:]}"
        else:
            results[job.run_dir] = None
    return results


def _main(jobs_file: str) -> None:
    import torch.distributed as dist

    from mmssl.pretrain.worker import train_job

    for spec in json.loads(Path(jobs_file).read_text()):
        job = Job(**spec)
        try:
            train_job(job.source, job.overrides, Path(job.run_dir), validate=True, overwrite=True)
            dist.barrier()
        except BaseException:
            Path(job.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(job.run_dir) / JOB_ERROR).write_text(f"rank {os.environ.get('RANK')}:\n{traceback.format_exc()}")
            sys.stderr.flush()
            os._exit(1)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo can abort in its teardown after training finished (as pretrain.worker)


if __name__ == "__main__":
    _main(sys.argv[1])

"""Training fault tolerance: NaN/inf losses skip the update on every rank, a killed rank ends the job quickly with
a clear error, and unreachable shard URLs are retried with exponential backoff, then skipped and counted."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mmssl.data_pipelines.batch import Batch
from mmssl.data_pipelines.epochs import reader_segments
from mmssl.data_pipelines.reader import FaultLog, ShardReader
from mmssl.data_pipelines.shards import resolve_shards, shard_sizes
from mmssl.data_pipelines.stream import ShardStream, read_once
from mmssl.pretrain.data import eval_decoders, modality_fields, train_decoders
from mmssl.pretrain.engine import check_train_config
from mmssl.pretrain.recipe import Recipe, RecipeError, TrainConfig, _Origin, from_dict
from tests.conftest import ROOT, run_ranks, tiny_recipe_dict, write_recipe
from tests.helpers.spawn import spawn_ranks

BAD_URLS = ["pipe:false", "pipe:cat /nonexistent/shard.tar"]
NAN_BATCH = 2  # the global step (0-based) whose batch on the last rank is poisoned


def _recipe(data: Path, **train: Any) -> Recipe:
    raw = tiny_recipe_dict(data, train={"steps": 5, "warmup_steps": 1, "ckpt_every": 0, **train})
    return from_dict(Recipe, raw, path=(), origin=_Origin("test", {}))


# ----------------------------------------------------------------------------------------------- config checks
def test_fault_settings_are_validated() -> None:
    check_train_config(TrainConfig(max_nonfinite_steps=0))  # 0 is valid: abort at the first one
    with pytest.raises(RecipeError, match=r"train\.max_nonfinite_steps must be >= 0, got -1"):
        check_train_config(TrainConfig(max_nonfinite_steps=-1))
    with pytest.raises(RecipeError, match=r"train\.collective_timeout_s must be > 0 seconds, got 0.0"):
        check_train_config(TrainConfig(collective_timeout_s=0.0))


# ----------------------------------------------------------------------------------------------- non-finite loss
def _fixed_source(recipe: Recipe, global_batch: int, skip: list[int], poison: list[int]):
    """Global batches of the shards in order, split over the ranks. ``poison``: those batches on the last rank get
    a NaN spectrogram. ``skip``: those global batches are left out (the reference run that never saw them)."""
    decoders = eval_decoders(recipe)

    def source(rank: int, world: int, start: int) -> Iterator[Batch]:
        per_rank = global_batch // world
        index = 0
        for batch in read_once(resolve_shards(recipe.data.train), fields=modality_fields(recipe), decoders=decoders,
                               batch_size=global_batch):
            if batch.index in skip or len(batch) < global_batch:
                continue
            part = batch.rows(rank * per_rank, (rank + 1) * per_rank)
            if batch.index in poison and rank == world - 1:
                part.inputs["audio"] = torch.full_like(part.inputs["audio"], float("nan"))
            part.index = index
            index += 1
            if part.index >= start:
                yield part

    return source


def _train_ranks(rank: int, world: int, data: str, run_dir: str, train: dict[str, Any], skip: list[int],
                 poison: list[int]) -> dict[str, Any]:
    from mmssl.pretrain.trainer import Trainer, TrainingDivergedError

    recipe = _recipe(Path(data), **train)
    recipe.data.batch_size = 16 // world
    source = _fixed_source(recipe, 16, skip, poison)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(recipe, Path(run_dir), batches=source)
    try:
        summary = trainer.fit()
    except TrainingDivergedError as exc:
        return {"error": str(exc)}
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return {"weights": weights, "nonfinite_steps": summary["nonfinite_steps"], "steps": summary["steps"],
            "lr": float(trainer.scheduler.get_last_lr()[0]), "final_loss": summary["final_loss"]}


def _train_runs(rank: int, world: int, runs: list[tuple]) -> list[dict[str, Any]]:
    """`_train_ranks` for each of ``runs`` (its arguments after ``world``), one after another on the same ranks."""
    return [_train_ranks(rank, world, *run) for run in runs]


@pytest.fixture(scope="module")
def nan_runs(asterisk_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, str], list[Any]]:
    """For ``grad_accum`` 1 and 2 (gradient cache), 5 steps on 2 ranks: ``poisoned`` (rank 1's batch 2 is NaN) and
    ``reference`` (never sees that step's batches, stops one step earlier); all on the same ranks, one after
    another. (grad_accum, kind) -> per-rank results."""
    tmp = tmp_path_factory.mktemp("nan")
    steps, runs, names = 5, [], []
    for grad_accum in (1, 2):
        train = {"steps": steps, "grad_accum": grad_accum, "accumulation": "cached"}
        first = NAN_BATCH // grad_accum * grad_accum
        runs.append((str(asterisk_data), str(tmp / f"nan{grad_accum}"), train, [], [NAN_BATCH]))
        runs.append((str(asterisk_data), str(tmp / f"ref{grad_accum}"), {**train, "stop_at": steps - 1},
                     list(range(first, first + grad_accum)), []))
        names += [(grad_accum, "poisoned"), (grad_accum, "reference")]
    per_rank = spawn_ranks(_train_runs, runs)
    return {name: [per_rank[r][i] for r in range(2)] for i, name in enumerate(names)}


@pytest.mark.distributed
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_one_ranks_nan_skips_the_update_on_every_rank(nan_runs: dict[tuple[int, str], list[Any]],
                                                     asterisk_data: Path, grad_accum: int) -> None:
    """Rank 1's batch 2 is NaN: both ranks skip the update of the step that holds it (with ``grad_accum=2`` under
    the gradient cache, before any backward of that step's two micro-batches), so the weights equal those of a run
    that never saw that step's batches (same LR schedule length, one optimizer step fewer), and the count is 1."""
    steps = 5
    poisoned, reference = nan_runs[grad_accum, "poisoned"], nan_runs[grad_accum, "reference"]
    for rank in (0, 1):
        got, want = poisoned[rank], reference[rank]
        assert got["nonfinite_steps"] == 1 and want["nonfinite_steps"] == 0
        assert got["steps"] == steps  # the step counter (and the stream) moved past the skipped batch
        assert got["lr"] == pytest.approx(want["lr"], abs=0, rel=1e-12)  # the schedule did not advance
        assert got["final_loss"] is not None and got["final_loss"] == got["final_loss"]  # NaN kept out
        for name, value in want["weights"].items():
            assert torch.isfinite(got["weights"][name]).all(), name
            torch.testing.assert_close(got["weights"][name], value, rtol=0, atol=1e-6, msg=name)
    initial = _recipe(asterisk_data)
    from mmssl.architectures.config import build_model

    start = build_model(initial.model, seed=initial.train.seed).state_dict()
    assert start.keys() == poisoned[0]["weights"].keys()
    moved = max(float((poisoned[0]["weights"][k] - v).abs().max()) for k, v in start.items())
    assert moved > 1e-3  # the other steps did train, so the equality is not vacuous


def test_consecutive_nan_steps_past_the_bound_abort_with_a_clear_error(asterisk_data: Path, tmp_path: Path) -> None:
    (result,) = spawn_ranks(_train_ranks, str(asterisk_data), str(tmp_path / "run"),
                            {"steps": 6, "max_nonfinite_steps": 1}, [], [1, 3, 4], world=1)
    # step 2 (batch 1) alone is tolerated; steps 4 and 5 in a row exceed the bound of 1 at step 5
    assert "error" in result, result
    assert "train.max_nonfinite_steps=1" in result["error"] and result["error"].startswith("step 5:")
    log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert [ln.split("step ")[1].split(":")[0] for ln in log.splitlines() if "non-finite loss" in ln] == \
        ["2", "4", "5"]


# ----------------------------------------------------------------------------------------------- unreachable URLs
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_unreachable_urls_are_retried_with_backoff_then_skipped(asterisk_data: Path) -> None:
    recipe = _recipe(asterisk_data)
    good = resolve_shards(str(asterisk_data / "train"))[:3]
    urls = [good[0], BAD_URLS[0], good[1], BAD_URLS[1], good[2]]
    records = _Records()
    logger = logging.getLogger("mmssl.data")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        t0 = time.perf_counter()
        batches = list(_read_all(urls, recipe, retries=2, backoff=0.2))
        elapsed = time.perf_counter() - t0
    finally:
        logger.removeHandler(records)
    stats: dict[str, int] = {}
    for b in batches:
        for k, v in b.stats.items():
            stats[k] = stats.get(k, 0) + v
    assert stats == {"unreachable_shards": 2}
    assert [(f["kind"], f["shard"]) for b in batches for f in b.faults] == [("unreachable_shards", u) for u in BAD_URLS]
    assert sum(len(b) for b in batches) == sum(shard_sizes(good).values())
    retries = [m for m in records.messages if "unreachable (attempt" in m]
    assert len(retries) == 2 * 2 and all("retrying in" in m for m in retries)
    assert [m.split("retrying in ")[1] for m in retries] == ["0.20s", "0.40s"] * 2  # exponential backoff
    skipped = [m for m in records.messages if "skipping unreachable shard" in m]
    assert [next(u for u in BAD_URLS if u in m) for m in skipped] == BAD_URLS
    assert elapsed >= 2 * (0.2 + 0.4)  # the waits really happened


def _read_all(urls: list[str], recipe: Recipe, *, retries: int, backoff: float) -> Iterator[Batch]:
    faults = FaultLog()
    reader = ShardReader(where="data.train", retries=retries, retry_backoff_s=backoff, faults=faults)
    for url in urls:
        samples = [s for _, s in reader.samples(url)]
        counts, found = faults.take()
        yield Batch(inputs={}, present={}, keys=[s["__key__"] for s in samples], stats=counts, faults=found)


def _train_with_bad_urls(rank: int, world: int, data: str, run_dir: str, steps: int) -> dict[str, Any]:
    from mmssl.pretrain.trainer import Trainer

    recipe = _recipe(Path(data), steps=steps)
    recipe.data.shuffle_buffer, recipe.data.streams_per_rank = 0, 1
    urls = resolve_shards(recipe.data.train) + BAD_URLS

    def source(rank: int, world: int, start: int) -> Iterator[Batch]:
        stream = ShardStream(urls, fields=modality_fields(recipe), decoders=train_decoders(recipe), batch_size=8,
                             start_batch=start, retries=1, retry_backoff_s=0.01)
        return iter(stream)

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    summary = Trainer(recipe, Path(run_dir), batches=source).fit()
    order = [seg.url for epoch in range(4)
             for seg in reader_segments(urls, sampling="continuous", seed=0, epoch=epoch, reader=0, readers=1)]
    return {"data_errors": summary["data_errors"], "steps": summary["steps"], "order": order}


def test_training_skips_unreachable_shards_every_epoch(asterisk_data: Path, tmp_path: Path) -> None:
    good = resolve_shards(str(asterisk_data / "train"))
    sizes = shard_sizes(good)
    assert sizes is not None
    steps = sum(sizes.values()) // 8 + 4  # into the second epoch
    (result,) = spawn_ranks(_train_with_bad_urls, str(asterisk_data), str(tmp_path / "run"), steps, world=1)
    assert result["steps"] == steps
    # independently: walk the shard order until the samples of `steps` batches of 8 were read
    needed, read, bad_reads, epoch = steps * 8, 0, 0, 0
    for i, url in enumerate(result["order"]):
        if read >= needed:
            break
        epoch = i // (len(good) + len(BAD_URLS))
        if url in BAD_URLS:
            bad_reads += 1
        else:
            read += sizes[url]
    assert epoch == 1 and bad_reads >= len(BAD_URLS)  # both epochs reached: a bad URL is met once per epoch
    assert result["data_errors"] == {"unreachable_shards": bad_reads}
    log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert log.count("unreachable (attempt 1 of 2)") == bad_reads
    assert log.count("skipping unreachable shard") == bad_reads


# ----------------------------------------------------------------------------------------------- dead rank
def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _rank_pid(root: int, rank: int) -> int | None:
    """The ``mmssl.pretrain.worker`` process with ``RANK=rank`` in its environment, among ``root``'s descendants."""
    todo = [root]
    while todo:
        pid = todo.pop()
        todo += _children(pid)
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mmssl.pretrain.worker" in cmd and f"RANK={rank}".encode() in env:
            return pid
    return None


@pytest.mark.distributed
def test_killed_rank_ends_the_job_with_a_clear_error(asterisk_data: Path, tmp_path: Path) -> None:
    timeout_s = 60
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(
        asterisk_data, train={"steps": 100000, "collective_timeout_s": timeout_s, "ckpt_every": 0}))
    run = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmssl", "pretrain", str(recipe), "--nproc", "2", "--run-dir",
                             str(run)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = proc.communicate(timeout=timeout_s + 60)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    # torchrun notices the dead child and stops the other rank within seconds (measured: about 2 s), long before
    # the collective timeout would fire
    assert took < 20, f"the job took {took:.0f}s to end after rank 1 died"
    # the launcher's own line names the dead rank, how it died, and its log (torchrun's agent runs in-process)
    # (rank 0 may be listed after it, failing on the connection rank 1 left)
    errors = [line for line in stderr.splitlines() if line.startswith("mmssl: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"mmssl: error: pretraining failed: rank 1 was killed by signal SIGKILL (exit -9); "
        f"see {run / 'logs' / 'rank1.log'}"), stderr[-3000:]
    assert not (run / "logs" / "rank1.exit").exists()  # it never got to write its exit record
    assert not (run / "summary.json").exists()


HUNG_RANK = """
import os, sys, time
import torch, torch.distributed as dist
from mmssl.pretrain.distributed import init_distributed
rank, _, _ = init_distributed({timeout})
if rank == 1:
    time.sleep(120)  # alive but hung: only the collective timeout can end rank 0's wait
t0 = time.monotonic()
try:
    dist.all_reduce(torch.ones(1))
except Exception as exc:
    print(f"rank0 collective failed after {{time.monotonic() - t0:.1f}}s: {{type(exc).__name__}}", flush=True)
    os._exit(3)
"""


@pytest.mark.distributed
def test_collective_timeout_ends_the_wait_on_a_hung_rank(tmp_path: Path) -> None:
    """``init_distributed(train.collective_timeout_s)``: rank 0 waiting on a hung rank 1 fails after the timeout."""
    script = tmp_path / "hung.py"
    script.write_text(HUNG_RANK.format(root=str(ROOT), timeout=3.0))
    t0 = time.monotonic()
    proc = run_ranks(2, [str(script)], timeout=100)
    took = time.monotonic() - t0
    assert proc.returncode != 0
    waited = float(proc.stdout.split("rank0 collective failed after ")[1].split("s:")[0])
    assert 2.5 <= waited <= 15, proc.stdout
    assert took < 60  # far less than rank 1's 120 s sleep: the job ended because the collective timed out

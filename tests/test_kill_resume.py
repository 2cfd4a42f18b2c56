"""Kill / resume fault tolerance through the `mmssl pretrain` command on 2 real ranks (ZeRO-2, fp32, deterministic).

One recipe (contrastive + a momentum teacher with feature queues + XDC clustering whose pseudo-labels are refreshed
every 3 steps; checkpoints every 2 steps; the sample keys of every consumed batch logged) is trained:

* **straight**: 10 steps, uninterrupted: the reference.
* **killed**: the whole process tree (launcher, ranks, data workers) is SIGKILLed at a step drawn by a seeded RNG,
  then resumed with ``train.resume=latest``.
* **chain**: started through a wrapper that SIGKILLs rank 0 in the middle of DeepSpeed writing the tag of step 4
  (partial files); then resumed (checkpoints every 5 steps) through a wrapper that SIGKILLs rank 0 after every
  file of step 10 is written but before the tag rename; then resumed to the end.

Every resumed run must end with weights, teacher, queues and pseudo-labels identical to the straight run, and
must have consumed exactly the same sample keys on every rank.

Also (no ranks started): the exit records ranks write (`pretrain.worker`) and the launcher's line naming the rank
that ended a job (`pretrain.launch.describe_failures`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from mmssl.pretrain.launch import describe_failures, failure_exit_code
from mmssl.pretrain.worker import exit_record_path, read_exit_record, run_and_teardown, write_exit_record
from mmssl.tools.export.run import consolidated_state_dict
from tests.conftest import ROOT, mmssl, run_ranks, tiny_recipe_dict, write_recipe

STEPS = 10
KILL_SEED = 20240602  # draws step 5: resumed from step 4, between two pseudo-label refreshes (3, 6)
CKPT = "checkpoints"

# The test process's own child: wraps one function so that rank 0 SIGKILLs itself at a precise point of a save.
KILLING_WORKER = """
import os, signal, sys
point, step = sys.argv[1].split(":")
tmp_tag = ".tmp-step_%08d" % int(step)
if point == "writing" and os.environ.get("RANK") == "0":
    import torch
    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # DeepSpeed's checkpoint engine calls torch.save once per file
        real_save(obj, f, *args, **kwargs)
        if tmp_tag in str(f):  # the first file of the tag is on disk, the others are not
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save
elif point == "renaming" and os.environ.get("RANK") == "0":
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(src).endswith(tmp_tag):  # every rank's files are written (after the barrier), not yet renamed
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
from mmssl.pretrain.worker import main
main(sys.argv[2:])
"""


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _recipe(data: Path) -> dict[str, Any]:
    return tiny_recipe_dict(
        data,
        data={"num_workers": 1},
        objectives={
            "momentum_contrastive": {"pairs": [["audio", "text"]], "queue_size": 24, "momentum": 0.9, "alpha": 0.4,
                                     "weight": 0.5},
            "clustering": {"variant": "xdc", "modalities": ["audio", "text"], "num_clusters": 4, "refresh_every": 3,
                           "samples_per_refresh": 32, "kmeans_iters": 5},
        },
        train={"steps": STEPS, "warmup_steps": 1, "log_keys": True, "ckpt_every": 2, "keep_last": 10},
    )


def _latest(run: Path) -> str:
    return (run / CKPT / "latest").read_text().strip()


def _step(tag: str) -> int:
    return int(tag.removeprefix("step_"))


def _weights(run: Path, tag: str) -> dict[str, torch.Tensor]:
    """The consolidated fp32 trainable state of ``tag`` (ZeRO partitions of both ranks gathered)."""
    return {k: v.detach() for k, v in consolidated_state_dict(run / CKPT, tag).items()}


def _module_state(run: Path, tag: str) -> dict[str, Any]:
    """The full module state DeepSpeed saved (parameters, buffers such as the teacher and the queues, and extra
    state such as the pseudo-labels)."""
    saved = torch.load(run / CKPT / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return saved["module"]


def _keys(run: Path, rank: int) -> list[str]:
    return (run / "keys" / f"rank{rank}.jsonl").read_text().splitlines()


def _same(a: Any, b: Any) -> bool:
    """Exact equality of nested dicts / lists / tensors (bit-identical tensors, same dtype)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _assert_same_run(run: Path, reference: Path, tags: list[str]) -> None:
    for tag in tags:
        got, want = _weights(run, tag), _weights(reference, tag)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), f"{tag}: {name}"
        got_m, want_m = _module_state(run, tag), _module_state(reference, tag)
        assert got_m.keys() == want_m.keys()
        different = [k for k in want_m if not _same(got_m[k], want_m[k])]
        assert not different, f"{tag}: module state differs from the uninterrupted run in {different[:8]}"


# ---------------------------------------------------------------------------------------------------- processes
def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _kill_tree(root: int) -> int:
    """Freeze (SIGSTOP) the launcher and every descendant until no new process appears, then SIGKILL them all:
    torchrun starts each rank in its own session, so a process-group kill alone would leave the ranks running."""
    frozen: set[int] = set()
    while True:
        tree = {root, *_descendants(root)}
        if tree <= frozen:
            break
        for pid in tree - frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= tree
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(frozen)


def _metrics_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line being written
            continue
    return steps


def _killing_worker(tmp: Path) -> Path:
    script = tmp / "killing_worker.py"
    script.write_text(KILLING_WORKER.format(root=str(ROOT)))
    return script


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def recipe(asterisk_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_recipe(tmp_path_factory.mktemp("kill_resume") / "r.yaml", _recipe(asterisk_data))


@pytest.fixture(scope="module")
def straight(recipe: Path) -> Path:
    run = recipe.parent / "straight"
    _check(mmssl("pretrain", str(recipe), "--nproc", "2", "--run-dir", str(run)))
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
    return run


@pytest.fixture(scope="module")
def killed(recipe: Path) -> dict[str, Any]:
    """SIGKILL the whole job once the step drawn by a seeded RNG is logged; then ``train.resume=latest``."""
    run = recipe.parent / "killed"
    kill_step = random.Random(KILL_SEED).randint(3, 8)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmssl", "pretrain", str(recipe), "--nproc", "2",
                             "--run-dir", str(run)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while max(_metrics_steps(run), default=0) < kill_step:
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {kill_step}"
            assert time.monotonic() < deadline, f"step {kill_step} was not reached"
            time.sleep(0.02)
        processes = _kill_tree(proc.pid)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
            proc.wait()
    time.sleep(0.5)  # let the killed ranks' pids be reaped
    at_kill = {"kill_step": kill_step, "processes": processes, "latest": _latest(run) if (run / CKPT / "latest")
               .exists() else None, "logged_steps": max(_metrics_steps(run)), "summary": (run / "summary.json")
               .exists(), "returncode": proc.returncode}
    _check(mmssl("pretrain", str(recipe), "train.resume=latest", "--nproc", "2", "--run-dir", str(run)))
    return {"run": run, **at_kill}


@pytest.fixture(scope="module")
def chain(recipe: Path) -> dict[str, Any]:
    """A fresh run killed while step 4 is being written (step 2 saved); resume (checkpoints every 5), killed before
    the rename of step 10; resume to the end. Snapshots of the checkpoint directory after each stage."""
    run = recipe.parent / "chain"
    worker = _killing_worker(recipe.parent)

    def snapshot() -> dict[str, Any]:
        root = run / CKPT
        return {"latest": _latest(run), "dirs": {p.name: sorted(f.name for f in p.iterdir())
                                                  for p in root.iterdir() if p.is_dir()}}

    def killed_resume(point: str, *overrides: str) -> dict[str, Any]:
        proc = run_ranks(2, [str(worker), point, "--run-dir", str(run), str(recipe), "train.resume=latest",
                             *overrides])
        assert proc.returncode != 0, "the wrapper's kill did not happen"
        assert not (run / "logs" / "rank0.exit").exists()  # killed: rank 0 never wrote its exit record
        return snapshot()

    stages: dict[str, Any] = {}
    stages["writing"] = killed_resume("writing:4")
    stages["renaming"] = killed_resume("renaming:10", "train.ckpt_every=5")
    _check(mmssl("pretrain", str(recipe), "train.resume=latest", "--nproc", "2", "--run-dir", str(run)))
    stages["final"] = snapshot()
    return {"run": run, **stages}


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.distributed
def test_sigkill_at_a_random_step_then_resume_is_exact(killed: dict[str, Any], straight: Path) -> None:
    run = killed["run"]
    # the kill really happened after a checkpoint and before the end
    assert killed["returncode"] == -signal.SIGKILL and killed["processes"] >= 4  # launcher, 2 ranks, data workers
    assert killed["latest"] is not None and 2 <= _step(killed["latest"]) <= killed["kill_step"], killed
    assert killed["kill_step"] <= killed["logged_steps"] < STEPS and not killed["summary"], killed
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
    _assert_same_run(run, straight, [f"step_{STEPS:08d}"])


@pytest.mark.distributed
def test_kill_while_deepspeed_writes_the_tag_keeps_the_previous_checkpoint(chain: dict[str, Any]) -> None:
    after = chain["writing"]
    assert after["latest"] == "step_00000002"  # the last complete checkpoint
    assert "step_00000004" not in after["dirs"]
    partial = after["dirs"][".tmp-step_00000004"]
    assert "mp_rank_00_model_states.pt" in partial  # rank 0 died right after its first file ...
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" not in partial  # ... before its optimizer shard
    assert not any(name.startswith("rng_rank") for name in partial)


@pytest.mark.distributed
def test_kill_before_the_rename_keeps_the_previous_checkpoint(chain: dict[str, Any]) -> None:
    after = chain["renaming"]
    # the resume from step 2 saved step 5 (checkpoints every 5 here), which removed the stale partial step 4
    assert after["latest"] == "step_00000005"
    assert ".tmp-step_00000004" not in after["dirs"] and "step_00000004" not in after["dirs"]
    complete = set(after["dirs"][".tmp-step_00000010"])
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank00000.pt", "rng_rank00001.pt"} <= complete
    assert "step_00000010" not in after["dirs"]


@pytest.mark.distributed
def test_resume_after_the_killed_saves_is_exact(chain: dict[str, Any], straight: Path) -> None:
    run, final = chain["run"], chain["final"]
    assert final["latest"] == f"step_{STEPS:08d}"
    assert not [name for name in final["dirs"] if name.startswith(".tmp-")]  # stale tmp dirs cleaned up
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
    # steps 6 and 8 were trained after resuming from step 5 (pseudo-labels of the refresh at step 3 restored)
    _assert_same_run(run, straight, ["step_00000006", "step_00000008", f"step_{STEPS:08d}"])


@pytest.mark.distributed
@pytest.mark.parametrize("resumed", ["killed", "chain"])
def test_resumed_runs_consume_the_same_sample_keys(resumed: str, request: pytest.FixtureRequest,
                                                   straight: Path) -> None:
    """Each rank's keys log equals the uninterrupted run's line for line: the lines a killed run had written up
    to its last checkpoint survived the kill, and those after it were dropped and written again."""
    run = request.getfixturevalue(resumed)["run"]
    for rank in (0, 1):
        want = _keys(straight, rank)
        assert len(want) == STEPS and _keys(run, rank) == want, f"rank {rank} consumed different samples"


@pytest.mark.distributed
@pytest.mark.parametrize("resumed", ["killed", "chain"])
def test_resumed_runs_log_each_step_once(resumed: str, request: pytest.FixtureRequest) -> None:
    """metrics.jsonl of a resumed run: the records a killed run wrote after its last checkpoint are replaced, not
    duplicated (the loss curve and summary read it)."""
    assert _metrics_steps(request.getfixturevalue(resumed)["run"]) == list(range(1, STEPS + 1))


@pytest.mark.distributed
def test_teacher_queues_and_pseudo_labels_are_real_state(straight: Path) -> None:
    """The state the resume tests compare is not trivial: the teacher lags the student, the queues wrapped, the
    pseudo-labels cover the clustered samples."""
    state = _module_state(straight, f"step_{STEPS:08d}")
    prefix = "objectives.momentum_contrastive."
    teacher = {k.removeprefix(prefix + "teacher."): v for k, v in state.items() if k.startswith(prefix + "teacher.")}
    assert teacher and any(not torch.equal(v, state[f"model.{k}"]) for k, v in teacher.items()
                           if f"model.{k}" in state)
    assert int(state[prefix + "steps"]) == STEPS
    for side in ("audio", "text"):
        queue = prefix + f"queues.audio-text.{side}."
        assert int(state[queue + "filled"]) == 24 and int(state[queue + "ptr"]) == (STEPS * 16) % 24
        assert bool((state[queue + "ids"] != -1).all())
    labels = state["objectives.clustering._extra_state"]
    assert labels["step"] == 9 and set(labels["labels"]) == {"audio", "text"}
    assert all(len(c["keys"]) == 32 and int(c["labels"].max()) < 4 for c in labels["labels"].values())


# ---------------------------------------------------------------------------------------------------- exit records
class _UserError(ValueError):
    pass


def _raise(exc: BaseException) -> None:
    raise exc


def test_ranks_record_how_their_work_ended(tmp_path: Path) -> None:
    ok, bad, crash = (exit_record_path(tmp_path, r) for r in (0, 1, 2))
    assert run_and_teardown(lambda: None, (_UserError,), exit_record=ok) == 0
    assert run_and_teardown(lambda: _raise(_UserError("data.train: /x has no shards\nmore")), (_UserError,),
                            exit_record=bad) == 2
    with pytest.raises(RuntimeError, match="boom"):  # still propagates (torchrun reports the traceback)
        run_and_teardown(lambda: _raise(RuntimeError("boom")), (_UserError,), exit_record=crash)
    rank = int(os.environ.get("RANK", "0"))
    assert read_exit_record(ok) == {"rank": rank, "exit_code": 0, "error": None}
    assert read_exit_record(bad) == {"rank": rank, "exit_code": 2, "error": "data.train: /x has no shards"}
    assert read_exit_record(crash) == {"rank": rank, "exit_code": 1, "error": "RuntimeError: boom"}
    assert ok == tmp_path / "logs" / "rank0.exit" and not list((tmp_path / "logs").glob("*.part"))
    assert read_exit_record(exit_record_path(tmp_path, 7)) is None


def _failure(rank: int, exitcode: int) -> ProcessFailure:
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="<N/A>")


def test_launcher_line_names_the_killed_rank_before_its_peers(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    write_exit_record(exit_record_path(tmp_path, 0), 0, 1, "RuntimeError: Connection reset by peer")
    line = describe_failures(tmp_path, {0: _failure(0, 1), 1: _failure(1, -9)}, 2)
    assert line == (f"rank 1 was killed by signal SIGKILL (exit -9); see {logs / 'rank1.log'}; "
                    f"rank 0 failed (exit 1): RuntimeError: Connection reset by peer; see {logs / 'rank0.log'}")
    assert failure_exit_code(tmp_path, {0: _failure(0, 1), 1: _failure(1, -9)}) == 1
    # torchrun's agent ends the surviving ranks with SIGTERM once one died: named after the rank that died first
    line = describe_failures(tmp_path / "none", {0: _failure(0, -15), 1: _failure(1, -9)}, 2)
    assert line == (f"rank 1 was killed by signal SIGKILL (exit -9); see {tmp_path / 'none' / 'logs' / 'rank1.log'}; "
                    f"rank 0 was killed by signal SIGTERM (exit -15); see {tmp_path / 'none' / 'logs' / 'rank0.log'}")
    # a rank that ended with a code but wrote nothing (killed before the trainer, os._exit elsewhere)
    assert describe_failures(tmp_path, {1: _failure(1, 3)}, 2) == \
        f"rank 1 exited with code 3 and no exit record; see {logs / 'rank1.log'}"


def test_launcher_line_groups_ranks_with_the_same_user_error(tmp_path: Path) -> None:
    message = "train.resume='step_9': no such checkpoint " + "x" * 400
    for rank in (0, 1):
        write_exit_record(exit_record_path(tmp_path, rank), rank, 2, message)
    failures = {0: _failure(0, 2), 1: _failure(1, 2)}
    line = describe_failures(tmp_path, failures, 2)
    assert line == f"ranks 0, 1 failed (exit 2): {message[:300]}...; see {tmp_path / 'logs'}"
    assert failure_exit_code(tmp_path, failures) == 2  # bad input, as the CLI's own validation errors


def test_launcher_without_word_from_the_agent_says_no_exit_record(tmp_path: Path) -> None:
    """Multi-node or an agent failure: ranks whose record is missing are not assumed killed."""
    write_exit_record(exit_record_path(tmp_path, 0), 0, 0, None)
    assert describe_failures(tmp_path, {}, 2) == f"rank 1 left no exit record; see {tmp_path / 'logs' / 'rank1.log'}"
    write_exit_record(exit_record_path(tmp_path, 1), 1, 2, "data.train: bad")
    assert describe_failures(tmp_path, {}, 2) == \
        f"rank 1 failed (exit 2): data.train: bad; see {tmp_path / 'logs' / 'rank1.log'}"

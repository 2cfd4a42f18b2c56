"""Two nodes simulated on one machine: two torchrun agents (``--nnodes=2 --node_rank=0|1 --nproc_per_node=1``,
static rendezvous on 127.0.0.1), each starting ``mmssl pretrain`` as its one rank, as users run it on a cluster.

* **shared**: both nodes use one run directory (storage every node sees). 10 steps, checkpoints every 2, keep 2,
  stopped at step 6: exactly tags 4 and 6 remain, each whole (both ranks' files), ``latest`` = step 6; then both
  nodes resume to step 10.
* **node-local**: each node has its own run directory (a local disk). Node 1 is SIGKILLed while it writes the tag
  of step 6; node 0's collective then fails. Each copy must still hold its previous ``latest`` (step 4) whole for
  its own rank; both nodes resume from it to step 10, and each copy ends with tags 8 and 10 holding the model
  states and its own rank's files.
* Gathering the two node-local copies' tag directories into one (what the README tells users to do) gives the same
  consolidated weights, bit for bit, as the shared run: same world size, same samples, CPU determinism.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmssl.tools.export.run import consolidated_state_dict
from tests.conftest import ROOT, tiny_recipe_dict, write_recipe

STEPS, STOP, EVERY, KEEP = 10, 6, 2, 2
KILL_TAG = ".tmp-step_00000006"

# a node's one rank: `mmssl pretrain` under the external launcher; with KILL set, rank 1 SIGKILLs itself once the
# first file of KILL_TAG is on disk (a node dying in the middle of a save)
NODE = """
import os, signal, sys
kill = os.environ.get("MMSSL_TEST_KILL")
if kill and os.environ.get("RANK") == "1":
    import torch
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if kill in str(f):
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save
from mmssl.tools.cli import main
main(sys.argv[1:])
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(script: Path, recipe: Path, run_dirs: tuple[Path, Path], overrides: list[str], *,
               kill: str | None = None, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Start both agents at once and wait for both; returns their results (node 0, node 1)."""
    port = _port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("MMSSL_TEST_KILL", None)
    if kill:
        env["MMSSL_TEST_KILL"] = kill
    procs = []
    for node, run_dir in enumerate(run_dirs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", str(script),
               "pretrain", str(recipe), "--run-dir", str(run_dir), *overrides]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    deadline = time.monotonic() + timeout
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def _ok(results: list[subprocess.CompletedProcess]) -> None:
    for node, r in enumerate(results):
        assert r.returncode == 0, f"node {node}:\n{r.stderr[-4000:]}"


def _tags(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))


def _latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def _whole(tag_dir: Path, ranks: list[int]) -> bool:
    """The model states and, for each of ``ranks``, its ZeRO-2 partition, RNG state and stream position."""
    needed = ["mp_rank_00_model_states.pt"]
    for r in ranks:
        needed += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", f"rng_rank{r:05d}.pt", f"stream_rank{r:05d}.json"]
    return all((tag_dir / name).is_file() for name in needed)


@pytest.fixture(scope="module")
def nodes(asterisk_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("multinode")
    script = tmp / "node.py"
    script.write_text(NODE.format(root=str(ROOT)))
    recipe = write_recipe(tmp / "r.yaml", tiny_recipe_dict(asterisk_data, train={
        "steps": STEPS, "ckpt_every": EVERY, "keep_last": KEEP, "log_every": 2, "collective_timeout_s": 60.0}))
    shared = tmp / "shared"
    local = (tmp / "node0", tmp / "node1")
    out: dict[str, object] = {"shared": shared, "local": local}
    out["shared_stop"] = _two_nodes(script, recipe, (shared, shared), [f"train.stop_at={STOP}"])
    out["shared_stop_tags"] = _tags(shared) if shared.is_dir() else []
    out["shared_stop_latest"] = _latest(shared) if (shared / "checkpoints" / "latest").exists() else None
    out["shared_resume"] = _two_nodes(script, recipe, (shared, shared), ["train.resume=latest"])
    out["local_killed"] = _two_nodes(script, recipe, local, [], kill=KILL_TAG)
    out["local_killed_state"] = {str(d): (_tags(d), _latest(d)) for d in local if (d / "checkpoints").is_dir()}
    out["local_resume"] = _two_nodes(script, recipe, local, ["train.resume=latest"])
    return out


@pytest.mark.distributed
def test_shared_run_directory_keeps_exactly_the_newest_whole_tags(nodes: dict) -> None:
    _ok(nodes["shared_stop"])
    assert nodes["shared_stop_tags"] == ["step_00000004", "step_00000006"]
    assert nodes["shared_stop_latest"] == "step_00000006"
    _ok(nodes["shared_resume"])
    shared = nodes["shared"]
    assert _tags(shared) == ["step_00000008", "step_00000010"] and _latest(shared) == "step_00000010"
    assert all(_whole(shared / "checkpoints" / t, [0, 1]) for t in _tags(shared))
    assert not [p for p in (shared / "checkpoints").iterdir() if p.name.startswith(".")], "temporary tags left"
    steps = [json.loads(line)["step"] for line in (shared / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), steps  # resumed at 7, nothing lost or repeated
    summary = json.loads((shared / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 2


@pytest.mark.distributed
def test_a_node_killed_during_a_save_leaves_every_copy_resumable(nodes: dict) -> None:
    killed = nodes["local_killed"]
    assert killed[1].returncode != 0 and killed[0].returncode != 0, "the kill did not stop the job"
    node0, node1 = nodes["local"]
    state = nodes["local_killed_state"]
    for copy in (node0, node1):
        tags, latest = state[str(copy)]
        assert latest == "step_00000004" and tags == ["step_00000002", "step_00000004"], (copy, tags, latest)
    _ok(nodes["local_resume"])
    for rank, copy in enumerate((node0, node1)):
        assert _tags(copy) == ["step_00000008", "step_00000010"] and _latest(copy) == "step_00000010"
        for tag in _tags(copy):
            assert _whole(copy / "checkpoints" / tag, [rank]), f"{copy}/{tag} lacks files of rank {rank}"
    assert "resumed from step_00000004" in (node1 / "logs" / "rank1.log").read_text()


@pytest.mark.distributed
def test_gathered_node_local_copies_equal_the_shared_run(nodes: dict, tmp_path: Path) -> None:
    _ok(nodes["shared_resume"])
    _ok(nodes["local_resume"])
    node0, node1 = nodes["local"]
    gathered = tmp_path / "checkpoints"
    tag = "step_00000010"
    shutil.copytree(node0 / "checkpoints" / tag, gathered / tag)
    for f in (node1 / "checkpoints" / tag).iterdir():  # node 1's own rank files; the model states are the same
        if not (gathered / tag / f.name).exists():
            shutil.copy2(f, gathered / tag / f.name)
    got = consolidated_state_dict(gathered, tag)
    want = consolidated_state_dict(nodes["shared"] / "checkpoints", tag)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])][:5]

"""Atomic checkpoints through DeepSpeed's own save/load, plus the stream position and per-rank RNG states.

Layout under ``<run>/checkpoints``::

    step_00000100/             one DeepSpeed tag (model + optimizer + scheduler, ZeRO shards per rank)
        rng_rank00000.pt       per-rank RNG states (torch.load(weights_only=True)-safe: tensors, ints, tuples)
        stream_rank00000.json  per-rank stream position: the state of each of the rank's virtual streams after
                               the last batch consumed (shard cursors, RNG states, shuffle buffer references)
        frozen.json            when parts are frozen: their path + hash reference (`pretrain.frozen`); the
                               frozen weights themselves are not stored
    latest                     the newest complete tag, replaced atomically

A save goes to ``.tmp-step_...`` and is renamed once every rank has written its part; ``latest`` is then
replaced with a temp file + rename. A kill at any moment leaves ``latest`` naming a complete checkpoint. Only the
newest ``keep_last`` tags are kept. The trainer's own state (step, next batch index, samples seen, world size)
travels in DeepSpeed's ``client_state`` under ``"mmssl"``. Without ZeRO (stage 0) in bf16, DeepSpeed keeps the fp32
master weights as unnamed per-group lists; their parameter names travel under ``"mmssl_master_params"`` so that
export can match them (`master_param_names`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipelines.shards import atomic_write_text
from pretrain.frozen import check_reference, write_reference

CHECKPOINTS = "checkpoints"
MASTER_PARAM_NAMES = "mmssl_master_params"
LATEST = "latest"
TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
            "has_gauss": 0,
            "gauss": 0.0,
        }
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def master_param_names(engine: Any) -> list[list[str]] | None:
    """The parameter names of each group of fp32 master weights DeepSpeed's stage-0 fp16/bf16 optimizer saves
    (``optimizer.fp32_groups``, in the order of its ``fp16_groups``); None where the checkpoint names its weights
    itself (ZeRO stages 1-3, or fp32 training whose module weights are the master weights)."""
    groups = getattr(engine.optimizer, "fp16_groups", None)
    if engine.zero_optimization_stage() != 0 or groups is None:
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [[names[id(p)] for p in group] for group in groups]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine: Any, run_dir: Path, step: int, state: dict[str, Any], *, keep_last: int,
         frozen: dict[str, Any] | None = None, stream: dict[int, Any] | None = None) -> str:
    """Save a checkpoint; ``frozen`` (`pretrain.frozen.frozen_reference`) excludes frozen weights and stores the
    reference to them instead; ``stream``: this rank's stream positions (virtual stream -> position)."""
    root = run_dir / CHECKPOINTS
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    client_state: dict[str, Any] = {"mmssl": state}
    master = master_param_names(engine)
    if master is not None:
        client_state[MASTER_PARAM_NAMES] = master
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=frozen is not None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if frozen is not None and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        write_reference(root / tmp_tag, frozen)
    rng_file = root / tmp_tag / f"rng_rank{rank:05d}.pt"
    torch.save(rng_state(), str(rng_file) + ".part")
    os.replace(str(rng_file) + ".part", rng_file)
    if stream is not None:
        atomic_write_text(root / tmp_tag / f"stream_rank{rank:05d}.json",
                          json.dumps({str(v): p for v, p in sorted(stream.items())}) + "\n")
    _barrier()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one process per node finalises (shared or local disks)
        try:
            if (root / tag).exists():
                shutil.rmtree(root / tag)
            os.replace(root / tmp_tag, root / tag)
        except FileNotFoundError:
            pass  # another node's process renamed it on a shared filesystem
        atomic_write_text(root / LATEST, tag + "\n")
        _prune(root, keep_last)
    _barrier()
    return tag


def _prune(root: Path, keep_last: int) -> None:
    tags = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in tags[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def find(run_dir: Path, resume: str) -> tuple[Path, str] | None:
    """``(checkpoints root, tag)`` for ``resume`` = ``latest``, a tag, or a tag directory; None when ``latest`` is
    asked for and no checkpoint exists yet (a fresh start)."""
    if resume == "latest":
        root = run_dir / CHECKPOINTS
        latest = root / LATEST
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not (root / tag).is_dir():
            raise CheckpointError(f"{latest} names {tag!r}, which does not exist")
        return root, tag
    path = Path(resume)
    if path.is_dir() and path.name.startswith("step_"):
        return path.parent, path.name
    if (run_dir / CHECKPOINTS / resume).is_dir():
        return run_dir / CHECKPOINTS, resume
    raise CheckpointError(f"train.resume={resume!r}: no such checkpoint (use 'latest', a tag, or a tag directory)")


def load(engine: Any, root: Path, tag: str, frozen: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; returns the trainer state. ``frozen``:
    the reference of the frozen weights built now, checked against the checkpoint's. The rank's stream position
    is read by `load_stream`."""
    excluded = check_reference(root / tag, frozen)
    _, client_state = engine.load_checkpoint(str(root), tag=tag, load_module_strict=not excluded)
    if not client_state or "mmssl" not in client_state:
        raise CheckpointError(f"{root / tag} was not written by mmssl (no trainer state)")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = root / tag / f"rng_rank{rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state["mmssl"]


def load_stream(root: Path, tag: str) -> dict[int, Any] | None:
    """This rank's stream positions (virtual stream -> position) in checkpoint ``tag``; None when it has none."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = root / tag / f"stream_rank{rank:05d}.json"
    if not path.is_file():
        return None
    try:
        return {int(v): p for v, p in json.loads(path.read_text()).items()}
    except (json.JSONDecodeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: unreadable stream position: {exc}") from None

"""Atomic checkpoints through DeepSpeed's own save/load, plus the stream position and per-rank RNG states.

Layout under ``<run>/checkpoints``::

    step_00000100/             one DeepSpeed tag (model + optimizer + scheduler, ZeRO shards per rank)
        rng_rank00000.pt       per-rank RNG states (torch.load(weights_only=True)-safe: tensors, ints, tuples)
        stream_rank00000.json  per-rank stream position: the state of each of the rank's virtual streams after
                               the last batch consumed (shard cursors, RNG states, shuffle buffer references)
        frozen.json            when parts are frozen: their path + hash reference (`pretrain.frozen`); the
                               frozen weights themselves are not stored
    latest                     the newest complete tag, replaced atomically

A save writes every rank's files into ``.tmp-step_...``; after a barrier, the **finaliser** of each copy of the
run directory (`pretrain.storage`: global rank 0 on shared storage, each node's local rank 0 on node-local disks)
renames it to ``step_...`` and replaces ``latest`` (temp file + rename); after a second barrier it prunes to the
newest ``keep_last`` tags. So exactly one process finalises each tag in each copy, no process removes a file
another still writes, and a tag directory is complete by construction: a kill at any moment (of a rank, or of a
whole node) leaves ``latest`` naming a complete tag, and, because pruning waits for every copy to hold the new
tag, every copy still holds the tag all copies last had in common. A resume takes the newest tag that every copy
holds (`agree_resume`). The trainer's own state (step, next batch index, samples seen, world size) travels in
DeepSpeed's ``client_state`` under ``"mmssl"``, the parameter layout it was written with under
``"mmssl_param_layout"`` (`architectures.layers.legacy.PARAM_LAYOUT`): a checkpoint of an older layout whose
parameter names this mmssl no longer has is refused in one line (`check_param_layout`) before DeepSpeed reads it.
Without ZeRO (stage 0) in bf16, DeepSpeed keeps the fp32 master weights as unnamed per-group lists; their parameter
names travel under ``"mmssl_master_params"`` so that export can match them (`master_param_names`).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mmssl.architectures.layers.legacy import PARAM_LAYOUT
from mmssl.data_pipelines.shards import atomic_write_text
from mmssl.pretrain.errors import PretrainError
from mmssl.pretrain.frozen import check_reference, write_reference
from mmssl.pretrain.rundir import CHECKPOINTS
from mmssl.pretrain.storage import RunStorage

MASTER_PARAM_NAMES = "mmssl_master_params"
PARAM_LAYOUT_KEY = "mmssl_param_layout"
LATEST = "latest"
TMP_PREFIX = ".tmp-"


class CheckpointError(PretrainError):
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


def save(engine: Any, run_dir: Path, step: int, state: dict[str, Any], *, keep_last: int, storage: RunStorage,
         frozen: dict[str, Any] | None = None, stream: dict[int, Any] | None = None) -> str:
    """Save a checkpoint (collective; see the module docstring); ``frozen`` (`pretrain.frozen.frozen_reference`)
    excludes frozen weights and stores the reference to them instead; ``stream``: this rank's stream positions
    (virtual stream -> position); ``storage``: the run directory's layout across nodes."""
    root = run_dir / CHECKPOINTS
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    client_state: dict[str, Any] = {"mmssl": state, PARAM_LAYOUT_KEY: PARAM_LAYOUT}
    master = master_param_names(engine)
    if master is not None:
        client_state[MASTER_PARAM_NAMES] = master
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=frozen is not None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if frozen is not None and storage.finaliser:
        write_reference(root / tmp_tag, frozen)
    rng_file = root / tmp_tag / f"rng_rank{rank:05d}.pt"
    torch.save(rng_state(), str(rng_file) + ".part")
    os.replace(str(rng_file) + ".part", rng_file)
    if stream is not None:
        atomic_write_text(root / tmp_tag / f"stream_rank{rank:05d}.json",
                          json.dumps({str(v): p for v, p in sorted(stream.items())}) + "\n")
    _barrier()  # every rank's files are written
    if storage.finaliser:
        _finalise(root, tag)
    _barrier()  # every copy of the run directory holds the new tag
    if storage.finaliser:
        _prune(root, keep_last, step)
    return tag


def _finalise(root: Path, tag: str) -> None:
    """``.tmp-<tag>`` -> ``<tag>``, then ``latest`` -> ``<tag>``. A tag of the same name (a run resumed from an
    earlier checkpoint saves the same steps again) is first moved aside whole, so no partial tag ever exists."""
    if (root / tag).exists():
        aside = root / f"{TMP_PREFIX}replaced-{tag}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(root / tag, aside)
    os.replace(root / (TMP_PREFIX + tag), root / tag)
    atomic_write_text(root / LATEST, tag + "\n")


def _prune(root: Path, keep_last: int, step: int) -> None:
    """Keep the newest ``keep_last`` tags up to ``step``; tags past ``step`` (a run resumed from an earlier
    checkpoint left them) and temporary directories (saves a kill interrupted) go."""
    tags = sorted(p for p in root.glob("step_*") if p.is_dir())
    current = [p for p in tags if p.name <= tag_for(step)]
    for old in current[:-keep_last] + [p for p in tags if p.name > tag_for(step)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def complete_tags(run_dir: Path) -> list[str]:
    """The tags of ``run_dir`` that a save finalised (a ``step_*`` directory exists only once complete)."""
    root = run_dir / CHECKPOINTS
    return sorted(p.name for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def find(run_dir: Path, resume: str) -> tuple[Path, str] | None:
    """``(checkpoints root, tag)`` for ``resume`` = ``latest``, a tag, or a tag directory; None when ``latest`` is
    asked for and no checkpoint exists yet (a fresh start). Reads this process's copy only (export, evaluation)."""
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


def agree_resume(run_dir: Path, resume: str) -> tuple[Path, str] | None:
    """`find` for a training resume, agreed by every rank (collective): ``latest`` is the newest tag that every
    rank's copy of the run directory holds complete (None when no rank has one: a fresh start); a named tag must
    exist in every copy. The error names the ranks that lack it."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if resume == "latest":
        mine: list[str] = complete_tags(run_dir)
    else:
        try:
            found = find(run_dir, resume)
        except CheckpointError:
            found = None
        mine = [str(found[0] / found[1])] if found else []
    views: list[Any] = [mine] * world
    if world > 1:
        dist.all_gather_object(views, mine)
    if resume != "latest":
        missing = [r for r, v in enumerate(views) if not v]
        if missing:
            raise CheckpointError(f"train.resume={resume!r}: no such checkpoint in the run directory of rank(s) "
                                  f"{missing} (use 'latest', a tag, or a tag directory)")
        path = Path(mine[0])
        return path.parent, path.name
    common = set(views[0]).intersection(*map(set, views[1:]))
    if not common:
        if any(views):
            raise CheckpointError(f"train.resume=latest: the copies of {run_dir} hold no checkpoint in common "
                                  f"(rank -> tags: {dict(enumerate(views))})")
        return None
    return run_dir / CHECKPOINTS, max(common)


def deepspeed_globals() -> list[Any]:
    """The DeepSpeed classes its checkpoint files pickle (loaded with ``weights_only=True`` all the same)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, ZeroStageEnum]


def model_states(tag_dir: Path) -> dict[str, Any] | None:
    """The first of a tag's DeepSpeed model-states files (the ranks' agree on names and client state),
    memory-mapped so that no tensor is read; None when there is none or it cannot be read."""
    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        return None
    try:
        with torch.serialization.safe_globals(deepspeed_globals()):
            return torch.load(files[0], map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError):
        return None


def param_layout(tag_dir: Path) -> int:
    """The parameter layout a tag was written with: 1 for a checkpoint without the stamp (an older mmssl), the
    current one where the file cannot be read."""
    states = model_states(tag_dir)
    return PARAM_LAYOUT if states is None else int(states.get(PARAM_LAYOUT_KEY, 1))


def check_param_layout(tag_dir: Path, names: Iterable[str]) -> None:
    """`CheckpointError` when ``tag_dir`` was written with an older parameter layout and holds a name the task now
    lacks (``names``: the task's parameters and buffers), instead of DeepSpeed's missing-keys traceback."""
    states = model_states(tag_dir)
    if states is None or int(states.get(PARAM_LAYOUT_KEY, 1)) >= PARAM_LAYOUT:
        return
    saved = set(states.get("module") or {}) | {n for group in states.get("param_shapes") or [] for n in group}
    stale = sorted(saved - set(names))
    if stale:
        raise CheckpointError(
            f"{tag_dir} was written before mmssl's attention layers were unified (param_layout "
            f"{states.get(PARAM_LAYOUT_KEY, 1)}, e.g. {stale[0]!r}); resume it with the mmssl that wrote it or "
            f"restart (`mmssl export` still reads it, and its export loads here)")


def load(engine: Any, root: Path, tag: str, frozen: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; returns the trainer state. ``frozen``:
    the reference of the frozen weights built now, checked against the checkpoint's. The rank's stream position
    is read by `load_stream`."""
    excluded = check_reference(root / tag, frozen)
    module = engine.module
    check_param_layout(root / tag, [n for n, _ in (*module.named_parameters(), *module.named_buffers())])
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

"""Frozen parameters under DeepSpeed: kept out of the optimizer, out of checkpoints, and measured.

A frozen tower (``model.<m>.frozen: true``, or the frozen towers of a stitched model) has ``requires_grad=False``:
`pretrain.engine.param_groups` leaves it out of AdamW, so at every ZeRO stage it has no optimizer state and no
gradient buffer (ZeRO-1/2 flatten and partition only the optimizer's parameters; ZeRO-3 partitions the frozen weights
but never allocates their gradients).

Checkpoints store only trainable weights (DeepSpeed's ``exclude_frozen_parameters``) plus ``frozen.json``, a
reference to the frozen ones::

    {"parameters": 22713216,                      frozen parameter count
     "sources": {"towers.text": {"path": "/…/model.safetensors", "sha256": "…"}},
     "state_sha256": "…",                          digest of the frozen tensors at the save (ZeRO 0-2; null at
                                                   ZeRO-3): equal to the digest at the start of training
     "state_dtype": "bfloat16"}                    the dtype the digest is taken in: the run's compute dtype

Resuming rebuilds the frozen parts from the recipe (same paths, same seed) and checks both hashes, so a changed
weights file or a different random init is an error naming the file, not a silent drift. The state digest is taken
of the tensors cast to the run's compute dtype (`pretrain.precision.compute_dtype`): built in fp32 before the engine
casts them, or read in bf16 at a save, the same weights give the same digest. A resume in another precision
compares the files' hashes only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmssl.architectures.stitching.pretrained import sha256_file
from mmssl.data_pipelines.shards import atomic_write_text
from mmssl.pretrain.errors import PretrainError

FROZEN_FILE = "frozen.json"


class FrozenWeightsError(PretrainError):
    pass


def frozen_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if not p.requires_grad]


def frozen_state_sha256(module: nn.Module, dtype: torch.dtype = torch.float32) -> str | None:
    """sha256 over the frozen tensors' names, shapes and bytes once cast to ``dtype`` (name order); None when any
    is partitioned away (ZeRO-3 leaves an empty local shard)."""
    digest = hashlib.sha256()
    for name, p in sorted(frozen_parameters(module), key=lambda item: item[0]):
        if getattr(p, "ds_id", None) is not None:
            return None
        t = p.detach()
        t = (t.to(dtype) if t.is_floating_point() else t).cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def frozen_reference(model: nn.Module, task: nn.Module | None = None,
                     dtype: torch.dtype = torch.float32) -> dict[str, Any] | None:
    """The ``frozen.json`` content for ``model``'s frozen parameters, or None when nothing is frozen; ``dtype``:
    the run's compute dtype, the one its state digest is taken in.

    ``task`` (the module DeepSpeed wraps, holding ``model``) is checked too: DeepSpeed excludes every frozen
    parameter of it, so when the task holds frozen parameters outside the model (a momentum teacher, whose
    weights are its state), this returns None and checkpoints keep all weights."""
    frozen = frozen_parameters(model)
    if not frozen:
        return None
    if task is not None:
        inside = {id(p) for _, p in frozen}
        if any(id(p) not in inside for _, p in frozen_parameters(task)):
            return None
    sources = getattr(model, "frozen_sources", dict)()
    return {
        "parameters": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for _, p in frozen),
        "sources": {prefix: ({"path": path, "sha256": sha256_file(path)} if path else None)
                    for prefix, path in sorted(sources.items())},
        "state_sha256": frozen_state_sha256(model, dtype),
        "state_dtype": str(dtype).removeprefix("torch."),
    }


def write_reference(tag_dir: Path, reference: dict[str, Any]) -> None:
    atomic_write_text(tag_dir / FROZEN_FILE, json.dumps(reference, indent=2) + "\n")


def check_reference(tag_dir: Path, current: dict[str, Any] | None) -> bool:
    """Compare the checkpoint's ``frozen.json`` with the frozen weights now built; True when the checkpoint
    excludes frozen weights (load non-strictly). `FrozenWeightsError` names the file or part that changed."""
    stored_file = tag_dir / FROZEN_FILE
    if not stored_file.is_file():
        return False
    stored = json.loads(stored_file.read_text())
    if current is None:
        raise FrozenWeightsError(f"{stored_file}: the checkpoint was trained with {stored['parameters']} frozen "
                                 f"parameters, but the model built now has none")
    for prefix, ref in stored["sources"].items():
        now = current["sources"].get(prefix)
        if ref is None or now is None:
            if ref != now:
                raise FrozenWeightsError(f"{stored_file}: frozen part {prefix!r} was loaded from "
                                         f"{(ref or {}).get('path')}, now from {(now or {}).get('path')}")
            continue
        if now["sha256"] != ref["sha256"]:
            raise FrozenWeightsError(f"{stored_file}: frozen weights of {prefix!r} changed: {now['path']} has "
                                     f"sha256 {now['sha256'][:12]}…, the checkpoint was trained with "
                                     f"{ref['path']} (sha256 {ref['sha256'][:12]}…)")
    same_dtype = stored.get("state_dtype", current.get("state_dtype")) == current.get("state_dtype")
    if same_dtype and stored.get("state_sha256") and current.get("state_sha256") and stored["state_sha256"] != current[
            "state_sha256"]:
        raise FrozenWeightsError(f"{stored_file}: the frozen weights built now differ from those the checkpoint was "
                                 f"trained with (a different seed or init for a frozen random tower?)")
    return True


def optimizer_memory(engine: Any) -> dict[str, int]:
    """Bytes this rank holds for optimizer state, read from the live optimizer after training: AdamW's moments
    and DeepSpeed's fp32 master partition (ZeRO 1-3). Frozen parameters contribute nothing to either."""
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    state = sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
                if torch.is_tensor(t) and t.ndim > 0)
    masters = 0
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO-1/2, ZeRO-3
        for t in getattr(optimizer, attr, None) or []:
            masters += t.numel() * t.element_size()
    return {"optimizer_state_bytes": int(state), "master_weight_bytes": int(masters)}

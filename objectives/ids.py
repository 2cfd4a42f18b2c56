"""Stable per-sample ids from sample keys or ``batch.meta`` fields (same on every rank and across restarts).

Used wherever samples must be compared across ranks or steps: MIL-NCE positives and duplicate exclusion
(contrastive, SigLIP, matching), queue entries that duplicate the current batch (momentum).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mmssl.objectives.base import ObjectiveError

UNKNOWN_ID = -1  # a missing value (None or ""): nobody's positive or duplicate


def stable_id(value: Any) -> int:
    """A non-negative 63-bit id of ``value`` that is the same in every process (unlike the salted ``hash``): the
    blake2b digest of a string's UTF-8 bytes, or of the canonical JSON of any other value."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def to_device(t: Tensor, device: torch.device | str | None) -> Tensor:
    """Host tensor ``t`` on ``device`` without waiting for the device: on CUDA through pinned memory and a
    non-blocking copy (a copy from pageable memory first waits for the stream's queued work)."""
    target = torch.device(device) if device is not None else t.device
    if target.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(target, non_blocking=True)
    return t.to(target)


def meta_ids(values: Sequence[Any], device: torch.device | str | None = None) -> Tensor:
    """``int64[B]`` ids of sample keys or of one ``batch.meta`` field; ``None`` and ``""`` get `UNKNOWN_ID`.
    Computed on the host and sent with `to_device`."""
    ids = [UNKNOWN_ID if v is None or v == "" else stable_id(v) for v in values]
    return to_device(torch.tensor(ids, dtype=torch.int64), device)


def batch_meta_ids(batch: Any, name: str, rows: int, device: torch.device | str | None = None, *,
                   option: str = "field") -> Tensor:
    """`meta_ids` of ``batch.meta[name]``; raises `ObjectiveError` naming ``option`` when the batch does not carry
    that field (or carries the wrong number of values)."""
    meta = getattr(batch, "meta", None)
    if meta is None or name not in meta:
        fields = sorted(meta) if meta else []
        raise ObjectiveError(f"{option}={name!r}: batch.meta has no field {name!r} (fields: {fields})")
    if len(meta[name]) != rows:
        raise ObjectiveError(f"{option}={name!r}: batch.meta[{name!r}] has {len(meta[name])} entries for {rows} rows")
    return meta_ids(meta[name], device)


def same_id(row_ids: Tensor, col_ids: Tensor) -> Tensor:
    """``bool[B, N]``: row and column share a known id."""
    return (row_ids.unsqueeze(1) == col_ids.unsqueeze(0)) & (row_ids != UNKNOWN_ID).unsqueeze(1)


def check_meta_field(name: str, value: str | None) -> None:
    """Raise `ObjectiveError` unless ``value`` is ``None`` or a non-empty ``batch.meta`` field name."""
    if value is not None and (not isinstance(value, str) or not value):
        raise ObjectiveError(f"{name} must name a batch.meta field (e.g. 'text') or be null, got {value!r}")

"""The batch schema shared by every room: inputs and presence masks keyed by modality.

A `Batch` is what the stream yields and what models and objectives consume:

* ``inputs[m]``: a tensor ``[B, ...]`` (or a dict of such tensors, e.g. text ids and attention mask) for every
  modality ``m`` that at least one sample of the batch carries;
* ``present[m]``: ``bool[B]``, which samples really carry ``m`` (rows of absent samples hold zeros); a `Presence`,
  which also knows on the host how many rows carry each modality (counted where the batch was collated), so a
  model decides "every row / none / some" without reading the device;
* ``keys``: the webdataset sample keys, in order;
* ``meta``: non-tensor metadata fields (from a sample's ``.json`` member), one list entry per sample;
* ``index``: the position of this batch in its rank's stream (0, 1, 2, ... across the whole run), which is what
  a checkpoint records to resume sample-exactly;
* ``stats``: counters accumulated by the producing worker since its previous batch (corrupt members, skipped
  shards, rows per source, padding rows), summed by the trainer;
* ``faults``: the skipped data behind those counters, one record per fault (shard, key, member, error);
* ``position``: the state of the producing virtual stream right after this batch (`data_pipelines.stream`), what
  a checkpoint stores to resume the stream exactly;
* ``host``: on a batch moved to a device by `Batch.to`, the host batch it came from (objectives that draw random
  masks from the token ids read them there instead of copying them back from the device).

A missing modality costs nothing downstream: models skip modalities that are not in ``inputs`` and objectives
mask rows with ``present``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

TensorTree = Tensor | dict[str, Tensor]


class Presence(dict):
    """``modality -> bool[B]`` presence masks, plus ``counts``: ``modality -> rows present``, known on the host.

    Counts are taken from masks that live on the CPU (at collation, or when built from CPU masks) and travel with
    the masks to the device; a modality whose mask was first seen on a device has no count (`count` is None)."""

    def __init__(self, masks: Mapping[str, Tensor] | None = None, counts: Mapping[str, int] | None = None) -> None:
        super().__init__(masks or {})
        known = dict(counts or {})
        if isinstance(masks, Presence):
            known = {**masks.counts, **known}
        for m, mask in self.items():
            if m not in known and mask.device.type == "cpu":
                known[m] = int(mask.sum())
        self.counts = {m: n for m, n in known.items() if m in self}

    def __reduce__(self) -> tuple[Any, ...]:  # DataLoader workers pickle batches
        return Presence, (dict(self), self.counts)

    def __setitem__(self, modality: str, mask: Tensor) -> None:
        super().__setitem__(modality, mask)
        if mask.device.type == "cpu":
            self.counts[modality] = int(mask.sum())
        else:
            self.counts.pop(modality, None)

    def count(self, modality: str) -> int | None:
        return self.counts.get(modality)

    def subset(self, modalities: Sequence[str]) -> Presence:
        return Presence({m: self[m] for m in modalities if m in self}, self.counts)

    def map(self, fn: Any) -> Presence:
        """The masks through ``fn`` (a device move), the counts kept."""
        return Presence({m: fn(p) for m, p in self.items()}, self.counts)


@dataclass
class Batch:
    inputs: dict[str, TensorTree]
    present: Presence
    keys: list[str]
    meta: dict[str, list[Any]] = field(default_factory=dict)
    index: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    faults: list[dict[str, str]] = field(default_factory=list)
    position: dict[str, Any] | None = None
    host: Batch | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.present, Presence):
            self.present = Presence(self.present)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def modalities(self) -> list[str]:
        return list(self.inputs)

    def tensors(self) -> list[Tensor]:
        """Every tensor of the batch (inputs, nested ones included, and presence masks)."""
        out: list[Tensor] = []
        for value in self.inputs.values():
            out += list(value.values()) if isinstance(value, Mapping) else [value]
        return out + list(self.present.values())

    def to(self, device: torch.device | str, float_dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> Batch:
        """Move every tensor to ``device``; floating-point inputs are also cast to ``float_dtype`` when given."""

        def move(t: Tensor) -> Tensor:
            if float_dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=float_dtype, non_blocking=non_blocking)
            return t.to(device=device, non_blocking=non_blocking)

        on_host = all(t.device.type == "cpu" for t in self.tensors())
        return Batch(
            inputs={m: _map_tree(v, move) for m, v in self.inputs.items()},
            present=self.present.map(lambda p: p.to(device=device, non_blocking=non_blocking)),
            keys=self.keys,
            meta=self.meta,
            index=self.index,
            stats=self.stats,
            faults=self.faults,
            position=self.position,
            host=self if on_host else self.host,
        )

    def pin_memory(self) -> Batch:
        """Called by the DataLoader when ``pin_memory=True``."""
        return Batch(
            inputs={m: _map_tree(v, Tensor.pin_memory) for m, v in self.inputs.items()},
            present=self.present.map(Tensor.pin_memory),
            keys=self.keys,
            meta=self.meta,
            index=self.index,
            stats=self.stats,
            faults=self.faults,
            position=self.position,
        )

    def only(self, modalities: Sequence[str]) -> Batch:
        """The same rows restricted to ``modalities``."""
        keep = set(modalities)
        return Batch(inputs={m: v for m, v in self.inputs.items() if m in keep},
                     present=self.present.subset([m for m in self.present if m in keep]), keys=self.keys,
                     meta=self.meta, index=self.index, stats=self.stats, faults=self.faults, position=self.position,
                     host=self.host.only(modalities) if self.host is not None else None)

    def rows(self, start: int, stop: int) -> Batch:
        """The sub-batch of rows ``start:stop`` (used to split a global batch across ranks)."""
        return Batch(
            inputs={m: _map_tree(v, lambda t: t[start:stop]) for m, v in self.inputs.items()},
            present={m: p[start:stop] for m, p in self.present.items()},
            keys=self.keys[start:stop],
            meta={k: v[start:stop] for k, v in self.meta.items()},
            index=self.index,
            stats=dict(self.stats),
            faults=list(self.faults),
            position=self.position,
            host=self.host.rows(start, stop) if self.host is not None else None,
        )


def cat_batches(batches: Sequence[Batch]) -> Batch:
    """Rows of ``batches`` stacked in order, as one batch (what gradient accumulation over cached micro-batches
    computes its loss on). Every batch must carry the same modalities."""
    first = batches[0]
    for b in batches[1:]:
        if set(b.inputs) != set(first.inputs):
            raise ValueError(f"cannot concatenate batches {first.index} and {b.index}: modalities "
                             f"{sorted(first.inputs)} vs {sorted(b.inputs)}")
    inputs: dict[str, TensorTree] = {}
    for m, v in first.inputs.items():
        if isinstance(v, Mapping):
            inputs[m] = {k: torch.cat([b.inputs[m][k] for b in batches]) for k in v}  # type: ignore[index]
        else:
            inputs[m] = torch.cat([b.inputs[m] for b in batches])  # type: ignore[misc]
    stats: dict[str, int] = {}
    for b in batches:
        for k, n in b.stats.items():
            stats[k] = stats.get(k, 0) + n
    meta_keys = sorted({k for b in batches for k in b.meta})
    counts = {m: sum(b.present.count(m) or 0 for b in batches) for m in first.present
              if all(b.present.count(m) is not None for b in batches)}
    hosts = [b.host for b in batches]
    return Batch(
        inputs=inputs,
        present=Presence({m: torch.cat([b.present[m] for b in batches]) for m in first.present}, counts),
        keys=[k for b in batches for k in b.keys],
        meta={k: [x for b in batches for x in b.meta.get(k, [None] * len(b))] for k in meta_keys},
        index=first.index,
        stats=stats,
        faults=[f for b in batches for f in b.faults],
        position=batches[-1].position,
        host=cat_batches(hosts) if all(h is not None for h in hosts) else None,  # type: ignore[arg-type]
    )


def trim_padding(batches: Sequence[Batch], modalities: Sequence[str], multiple: int = 8) -> list[Batch]:
    """The batches without the padding columns all their rows share (dynamic padding), for token inputs on the host.

    For each modality in ``modalities`` whose input is a dict with an ``attention_mask [B, L]`` (text: fixed
    ``max_len`` from the tokenizer), keep the first ``L' = min(L, multiple·⌈n / multiple⌉)`` columns of every
    ``[B, L, ...]`` entry, ``n = 1 +`` the last column where any row of any of the batches has its mask set
    (``L' = multiple`` capped at ``L`` when no row has a token); so the batches keep one common length (micro-batches
    that are concatenated later). Exact for every consumer that masks padded keys or is causal and reads real
    positions only (the cut columns hold padding in every row). ``multiple`` keeps the set of shapes small (fewer
    kernel and ``torch.compile`` variants). Other modalities and the rest of each batch are unchanged; a cut batch
    is returned as a new `Batch` (the inputs are not modified)."""
    keeps: dict[str, int] = {}
    for m in modalities:
        masks = [b.inputs[m]["attention_mask"] for b in batches  # type: ignore[index]
                 if isinstance(b.inputs.get(m), Mapping) and "attention_mask" in b.inputs[m]]  # type: ignore[operator]
        if masks and len({mask.shape[1] for mask in masks}) == 1:
            n = max(_last_token(mask) for mask in masks)
            keeps[m] = min(masks[0].shape[1], multiple * max(1, -(-n // multiple)))
    return [_cut(b, keeps) for b in batches]


def _last_token(mask: Tensor) -> int:
    """``1 +`` the last column where any row's mask is set (0 for none)."""
    used = mask.reshape(mask.shape[0], mask.shape[1]).ne(0).any(0).nonzero()
    return int(used[-1]) + 1 if used.numel() else 0


def _cut(batch: Batch, keeps: Mapping[str, int]) -> Batch:
    inputs: dict[str, TensorTree] = dict(batch.inputs)
    for m, keep in keeps.items():
        value = inputs.get(m)
        if not isinstance(value, Mapping) or "attention_mask" not in value:
            continue
        width = value["attention_mask"].shape[1]
        if keep < width:
            inputs[m] = {k: _first_columns(t, keep) if t.dim() >= 2 and t.shape[1] == width else t
                         for k, t in value.items()}
    if all(inputs[m] is batch.inputs[m] for m in inputs):
        return batch
    return replace(batch, inputs=inputs)


def _first_columns(t: Tensor, keep: int) -> Tensor:
    out = t[:, :keep].contiguous()
    return out.pin_memory() if t.is_pinned() else out  # a pinned loader batch stays pinned for its async copy


def _map_tree(value: TensorTree, fn: Any) -> TensorTree:
    if isinstance(value, Mapping):
        return {k: fn(v) for k, v in value.items()}
    return fn(value)


def collate(
    samples: Sequence[Mapping[str, Any]],
    modalities: Sequence[str],
    *,
    index: int = 0,
    stats: Mapping[str, int] | None = None,
    templates: Mapping[str, TensorTree] | None = None,
    faults: Sequence[Mapping[str, str]] = (),
    position: Mapping[str, Any] | None = None,
) -> Batch:
    """Stack decoded samples into a `Batch`.

    Each sample is a mapping with ``__key__``, an optional ``__meta__`` dict, and for each modality either a decoded
    tensor (tree) or ``None`` when the sample lacks it (or its member failed to decode). Absent rows are filled with
    zeros shaped like a present row, and marked in ``present``; a modality no row carries is left out, unless
    ``templates`` gives its zero input (then every row is absent).
    """
    keys = [str(s["__key__"]) for s in samples]
    inputs: dict[str, TensorTree] = {}
    present: dict[str, Tensor] = {}
    for m in modalities:
        values = [s.get(m) for s in samples]
        mask = torch.tensor([v is not None for v in values], dtype=torch.bool)
        present[m] = mask
        template = next((v for v in values if v is not None), None)
        if template is None:
            if templates is None or m not in templates:
                continue
            template = templates[m]
        inputs[m] = _stack([v if v is not None else zeros_like_tree(template) for v in values])
    meta_keys: list[str] = sorted({k for s in samples for k in (s.get("__meta__") or {})})
    meta = {k: [(s.get("__meta__") or {}).get(k) for s in samples] for k in meta_keys}
    return Batch(inputs=inputs, present=present, keys=keys, meta=meta, index=index, stats=dict(stats or {}),
                 faults=[dict(f) for f in faults], position=dict(position) if position is not None else None)


def zeros_like_tree(value: TensorTree) -> TensorTree:
    if isinstance(value, Mapping):
        return {k: torch.zeros_like(v) for k, v in value.items()}
    return torch.zeros_like(value)


def _stack(values: list[TensorTree]) -> TensorTree:
    first = values[0]
    if not isinstance(first, (Tensor, Mapping)):
        raise TypeError(f"decoders must return tensors (or dicts of tensors), got {type(first).__name__}")
    if isinstance(first, Mapping):
        return {k: torch.stack([v[k] for v in values]) for k in first}  # type: ignore[index]
    return torch.stack(values)  # type: ignore[arg-type]

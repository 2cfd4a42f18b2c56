"""Labelled splits for fine-tuning, and how an epoch's samples are cut into equal per-rank batches.

Reading: every sample of the shards that carries the encoder's modality and the label field is kept as its raw
member bytes (checked once with the evaluation decoder: a member that fails to decode is skipped and counted, as
in `data_pipelines.stream`). Training decodes the bytes again every epoch with the modality's augmenting decoder,
seeded per sample by ``(seed, epoch, crc32(key))`` (the stream's convention), so augmentation is the same for any
number of ranks. Validation and test inputs are decoded once, without augmentation.

Rank policy (**pad by wrap-around**): epoch ``e`` permutes the ``N`` training samples with a generator seeded by
``(seed, e)``, repeats the permutation from its start to ``S·G`` entries (``S = ⌈N / G⌉`` steps, global batch
``G = batch_size · world``), and global batch ``i`` is entries ``i·G .. (i+1)·G - 1``, of which rank ``r`` takes the
``r``-th ``batch_size`` rows. Every rank does ``S`` steps per epoch (no hang at an uneven end), each sample is seen
at least once per epoch (``S·G - N`` are seen twice), and 1 rank at batch ``G`` sees the same global batches as
``W`` ranks at ``G / W``. Evaluation splits ``r::world`` are padded the same way to equal batch counts, the padding
rows masked out of the counts (under ZeRO-3 every forward is a collective, so counts must be equal).
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mmssl.architectures.modalities import get_modality
from mmssl.data_pipelines.batch import Batch, collate
from mmssl.data_pipelines.shards import resolve_shards
from mmssl.data_pipelines.stream import read_once
from mmssl.tools.errors import ToolError
from mmssl.tools.evaluation.probe import stratified_split

if TYPE_CHECKING:
    from mmssl.architectures.encoder import Encoder
    from mmssl.tools.finetune.config import FinetuneConfig

Decoder = Callable[[bytes, np.random.Generator], Any]


@dataclass
class LabelledSet:
    """Raw samples of one split: keys, the modality member's bytes, string labels."""

    keys: list[str]
    raw: list[bytes]
    labels: list[str]
    data_errors: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # samples without the modality / without the label

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, index: Sequence[int]) -> LabelledSet:
        return LabelledSet([self.keys[i] for i in index], [self.raw[i] for i in index],
                           [self.labels[i] for i in index], dict(self.data_errors), dict(self.skipped))


def read_labelled(shards: str | list[str], *, modality: str, exts: Sequence[str], label: str, check: Decoder,
                  where: str, batch_size: int = 64) -> LabelledSet:
    """Every sample of ``shards`` with the modality and ``label``; ``check`` (the evaluation decoder) must decode
    the member. `ToolError` when no sample carries ``label`` (naming the fields that are there)."""
    urls = resolve_shards(shards, where=where)
    store: list[bytes] = []

    def keep(data: bytes, rng: np.random.Generator) -> Tensor:
        check(data, rng)  # raises on a corrupt member: read_once counts it and marks the modality absent
        store.append(data)
        return torch.tensor(len(store) - 1)

    out = LabelledSet([], [], [])
    fields: set[str] = set()
    errors: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for batch in read_once(urls, fields={modality: list(exts)}, decoders={modality: keep}, batch_size=batch_size,
                           where=where):
        errors.update(batch.stats)
        fields.update(batch.meta)
        handles = batch.inputs.get(modality)
        values = batch.meta.get(label, [None] * len(batch))
        for i, key in enumerate(batch.keys):
            if not bool(batch.present[modality][i]):
                skipped[f"no_{modality}"] += 1
            elif values[i] is None:
                skipped["no_label"] += 1
            else:
                out.keys.append(key)
                out.raw.append(store[int(handles[i])])
                out.labels.append(str(values[i]))
        store.clear()
    if label not in fields:
        raise ToolError(f"{where}: no sample carries the label field {label!r} (fields: {sorted(fields)})")
    if not out.keys:
        raise ToolError(f"{where}: no sample has both the {modality!r} modality and the label {label!r}")
    out.data_errors, out.skipped = dict(errors), dict(skipped)
    return out


def _no_check(data: bytes, rng: np.random.Generator) -> None:
    return None


@dataclass
class Splits:
    train: LabelledSet
    val: LabelledSet
    test: LabelledSet | None
    classes: list[str]

    def targets(self, split: LabelledSet) -> Tensor:
        index = {c: i for i, c in enumerate(self.classes)}
        return torch.tensor([index[c] for c in split.labels], dtype=torch.long)


def make_splits(train: LabelledSet, val: LabelledSet | None, test: LabelledSet | None, *, val_fraction: float,
                seed: int) -> Splits:
    """Classes from the training shards (sorted); without ``val`` a stratified ``val_fraction`` of ``train``
    (`tools.evaluation.probe.stratified_split`, deterministic by ``seed``). `ToolError` for < 2 classes, an empty
    split, or validation / test labels the training split never has."""
    classes = sorted(set(train.labels))
    if len(classes) < 2:
        raise ToolError(f"--shards: fine-tuning needs at least 2 classes, got {classes}")
    if val is None:
        index = {c: i for i, c in enumerate(classes)}
        tr, va = stratified_split(torch.tensor([index[c] for c in train.labels]), val_fraction, seed)
        if va.numel() == 0:
            raise ToolError(f"--val-fraction={val_fraction} leaves no validation sample out of {len(train)}")
        train, val = train.subset(tr.tolist()), train.subset(va.tolist())
        val.data_errors, val.skipped = {}, {}  # counted once, with the training shards they were read from
    for name, split in (("--val-shards", val), ("--test-shards", test)):
        unseen = sorted(set(split.labels) - set(classes)) if split is not None else []
        if unseen:
            raise ToolError(f"{name}: labels {unseen} never occur in the training split")
    return Splits(train, val, test, classes)


def load_splits(cfg: FinetuneConfig, encoder: Encoder, *, decode_check: bool = True) -> Splits:
    """Train / validation / test splits of the shards named in ``cfg``, for ``encoder``'s modality. Without
    ``decode_check`` members are not decoded (a cheap check of labels and classes before the ranks start)."""
    plugin = get_modality(encoder.modality)
    check = plugin.decoder(encoder.cfg, train=False) if decode_check else _no_check

    def read(shards: str, where: str) -> LabelledSet:
        return read_labelled(shards, modality=encoder.modality, exts=plugin.extensions, label=cfg.label,
                             check=check, where=where)

    train = read(cfg.shards, "--shards")
    val = read(cfg.val_shards, "--val-shards") if cfg.val_shards else None
    test = read(cfg.test_shards, "--test-shards") if cfg.test_shards else None
    return make_splits(train, val, test, val_fraction=cfg.val_fraction, seed=cfg.seed)


# ------------------------------------------------------------------------------------------------ batching
def steps_per_epoch(n: int, global_batch: int) -> int:
    return math.ceil(n / global_batch)


def epoch_order(n: int, global_batch: int, epoch: int, seed: int) -> Tensor:
    """The epoch's ``S·G`` sample indices: a seeded permutation of ``range(n)`` repeated from its start."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    total = steps_per_epoch(n, global_batch) * global_batch
    return perm.repeat(math.ceil(total / n))[:total]


def rank_rows(order: Tensor, step: int, batch_size: int, rank: int, world: int) -> Tensor:
    """Rank ``rank``'s rows of global batch ``step`` of an `epoch_order`."""
    start = step * batch_size * world + rank * batch_size
    return order[start:start + batch_size]


def eval_rows(n: int, batch_size: int, rank: int, world: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``(indices, real)`` batches of rank ``rank``'s evaluation share ``r::world``, as many on every rank; padding
    rows repeat index 0 and have ``real = False``."""
    mine = torch.arange(rank, n, world)
    batches = math.ceil(math.ceil(n / world) / batch_size)
    for b in range(batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        real = torch.ones(batch_size, dtype=torch.bool)
        real[idx.numel():] = False
        yield torch.cat([idx, idx.new_zeros(batch_size - idx.numel())]), real


def decode_batch(split: LabelledSet, rows: Tensor, modality: str, decoder: Decoder, *, seed: int,
                 epoch: int) -> Batch:
    """The rows of ``split`` decoded (with per-sample RNG ``(seed, epoch, crc32(key))``) and collated."""
    samples = []
    for i in rows.tolist():
        key = split.keys[i]
        rng = np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])
        try:
            value = decoder(split.raw[i], rng)
        except Exception as exc:  # the bytes decoded once already (read_labelled): a decoder bug, not bad data
            raise RuntimeError(f"sample {key!r} decoded at load time but its training decode failed: {exc}") from exc
        samples.append({"__key__": key, modality: value})
    return collate(samples, [modality])


class EvalCache:
    """Validation / test inputs decoded once (no augmentation), batched per `eval_rows`."""

    def __init__(self, split: LabelledSet, modality: str, decoder: Decoder, seed: int) -> None:
        self.split, self.modality, self.decoder, self.seed = split, modality, decoder, seed
        self._decoded: dict[int, Any] = {}

    def batches(self, batch_size: int, rank: int, world: int) -> Iterator[tuple[Batch, Tensor, Tensor]]:
        """``(batch, row indices, real mask)`` for this rank."""
        for rows, real in eval_rows(len(self.split), batch_size, rank, world):
            samples = []
            for i in rows.tolist():
                if i not in self._decoded:
                    key = self.split.keys[i]
                    rng = np.random.default_rng([self.seed, 0, zlib.crc32(key.encode())])
                    self._decoded[i] = self.decoder(self.split.raw[i], rng)
                samples.append({"__key__": self.split.keys[i], self.modality: self._decoded[i]})
            yield collate(samples, [self.modality]), rows, real

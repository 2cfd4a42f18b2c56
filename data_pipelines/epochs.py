"""Which samples each reader reads in each epoch: the three sampling modes (``data.sampling``).

There are ``R = world_size x streams_per_rank`` readers (virtual streams); reader ``g = rank·V + v``. In epoch
``e`` the shard list is permuted with ``Random(f"{seed}:{e}")``, the same permutation on every rank. A reader reads
a list of `Segment` s (a shard, or a range of its samples):

* ``continuous`` (default): reader ``g`` reads the whole shards ``order[g::R]``; epoch after epoch, forever. Every
  sample is read once per epoch, but readers' epochs end at different times (shards differ in size), so a shuffle
  buffer mixes neighbouring epochs. Needs ``num_shards >= R``.
* ``exact``: the permuted shards are laid end to end (sizes from ``index.json``), the ``N`` samples are cut into
  ``R`` contiguous ranges ``[⌊gN/R⌋, ⌊(g+1)N/R⌋)`` (a reader may start or stop inside a shard), so readers differ by
  at most one sample (**rebalance**). Each epoch is exactly ``P·B`` rows per reader, ``P = ⌈max_g n_g / B⌉``: a
  reader's shuffle buffer is drained at the epoch's end and the rest of its last batch is **padded** with empty
  rows (every modality absent, key ``""``), which every objective ignores. So every sample is seen exactly once per
  epoch, none is dropped or repeated, and all ranks take the same number of steps. Works with any number of shards.
* ``resampled``: reader ``g`` draws ``⌈num_shards / R⌉`` shards with replacement per epoch from
  ``Random(f"{seed}:{e}:{g}:resampled")`` (webdataset's ``resampled=True``, seeded): infinite, works with any
  number of shards; a sample may be read several times or not at all in an epoch.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mmssl.data_pipelines.shards import DataError

SAMPLINGS = ("continuous", "exact", "resampled")


@dataclass(frozen=True)
class Segment:
    """Samples ``start <= offset < stop`` of shard ``url`` (``stop=None``: to the shard's end)."""

    url: str
    start: int = 0
    stop: int | None = None


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_shards))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def exact_counts(total: int, readers: int) -> list[int]:
    """Samples per reader in one exact epoch: ``⌊(g+1)N/R⌋ - ⌊gN/R⌋``."""
    return [(g + 1) * total // readers - g * total // readers for g in range(readers)]


def exact_batches_per_epoch(total: int, readers: int, batch_size: int) -> int:
    """``P = ⌈max_g n_g / B⌉``: batches every reader yields per exact epoch."""
    return -(-max(exact_counts(total, readers)) // batch_size)


def reader_segments(urls: Sequence[str], *, sampling: str, seed: int, epoch: int, reader: int, readers: int,
                    sizes: Mapping[str, int] | None = None) -> list[Segment]:
    """The segments reader ``reader`` of ``readers`` reads in ``epoch``, in order."""
    if sampling == "continuous":
        return [Segment(urls[i]) for i in shard_order(len(urls), seed, epoch)[reader::readers]]
    if sampling == "resampled":
        rng = random.Random(f"{seed}:{epoch}:{reader}:resampled")
        return [Segment(urls[rng.randrange(len(urls))]) for _ in range(-(-len(urls) // readers))]
    if sampling != "exact":
        raise DataError(f"data.sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if sizes is None:
        raise DataError("data.sampling=exact needs the samples per shard: point data.train at a dataset directory "
                        "with an index.json (`mmssl index-shards DIR` writes one for a directory of tars)")
    total = sum(sizes[u] for u in urls)
    lo, hi = reader * total // readers, (reader + 1) * total // readers
    segments, position = [], 0
    for i in shard_order(len(urls), seed, epoch):
        size = sizes[urls[i]]
        start, stop = max(lo, position), min(hi, position + size)
        if start < stop:
            segments.append(Segment(urls[i], start - position, stop - position))
        position += size
    return segments

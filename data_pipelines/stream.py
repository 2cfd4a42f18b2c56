"""A deterministic, resumable webdataset stream that yields `Batch` objects.

How the sample order is defined (and why it survives a restart exactly):

* Each rank reads ``streams_per_rank`` (V) independent *virtual streams*. In epoch ``e`` the shard list is
  permuted with ``Random(f"{seed}:{e}")`` and shard ``order[i]`` goes to global stream ``i mod (world·V)``; a
  stream reads its shards in that order, epoch after epoch (infinite, so ranks never run dry at different times
  and no collective hangs at an uneven epoch end).
* Each virtual stream has its own shuffle buffer (size ``shuffle_buffer``) driven by ``Random(f"{seed}:{rank}:{v}")``
  and cuts its shuffled samples into batches of ``batch_size``.
* The rank's batch number ``b`` comes from stream ``b mod V`` (its ``b // V``-th batch). DataLoader worker ``w`` of
  ``k`` produces batches ``start + w, start + w + k, ...``; since the DataLoader returns worker outputs round-robin,
  the rank sees batches ``start, start+1, ...`` in order, for any ``k`` that divides V.
* Per-sample randomness (augmentation) is seeded by ``(seed, epoch, crc32(key))``, not by a worker's RNG.

So the whole stream is a pure function of ``(shards, seed, rank, world, V, batch_size, shuffle_buffer)``, and the
only state a checkpoint needs is the index of the next batch. Resuming at batch ``start`` fast-forwards each
virtual stream through its raw samples (tar members are read but not decoded) to where it stood.

Faults never stop the stream: an unreadable shard, a truncated tar or a member that fails to decode is logged with
its shard and key, counted in ``Batch.stats``, and skipped (a modality that fails to decode is marked absent in
``Batch.present``, so batch shapes stay fixed and every rank stays in step). A remote shard (``pipe:`` command,
http URL) that fails before yielding its first sample is retried ``retries`` times after waiting
``retry_backoff_s · 2^(attempt-1)`` seconds (exponential backoff: 1x, 2x, 4x, ...), then skipped and counted as
``unreachable_shards`` with a log line naming the URL; a failure after the first sample is not retried (a tar stream
cannot be resumed mid-way without re-yielding samples) and counts as before.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipelines.batch import Batch, TensorTree, collate
from data_pipelines.shards import DataError, is_remote

log = logging.getLogger("mmssl.data")

Decoder = Callable[[bytes, np.random.Generator], TensorTree]
"""Turns one shard member's bytes into a tensor (tree); the generator drives any random augmentation."""

META_EXTENSION = "json"


@dataclass(frozen=True)
class RawSample:
    key: str
    url: str
    epoch: int
    members: dict[str, bytes]


class ShardStream(IterableDataset):
    """Batches of decoded samples from webdataset shards; see the module docstring for the order it defines.

    Args:
        urls: shard URLs (local paths, ``pipe:`` commands, http URLs).
        fields: modality -> shard member extensions to read it from (the first one a sample has wins).
        decoders: modality -> `Decoder`.
        batch_size: samples per batch (per rank).
        rank, world_size: this rank and the number of ranks that split the shards.
        seed: defines the shard order, shuffle buffers and per-sample augmentation.
        shuffle_buffer: size of each virtual stream's sample shuffle buffer (0 or 1: no sample shuffle).
        streams_per_rank: virtual streams per rank (V); DataLoader workers must divide it.
        start_batch: index of the first batch to yield (resume position).
        where: the origin of ``urls`` (recipe key or CLI flag) for error messages.
        retries: extra attempts at a remote shard that fails before its first sample (``data.retries``).
        retry_backoff_s: wait before the first retry, doubled for each further one (``data.retry_backoff_s``).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        fields: Mapping[str, Sequence[str]],
        decoders: Mapping[str, Decoder],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 0,
        streams_per_rank: int = 1,
        start_batch: int = 0,
        where: str = "shards",
        retries: int = 3,
        retry_backoff_s: float = 1.0,
    ) -> None:
        super().__init__()
        if retries < 0:
            raise DataError(f"data.retries must be >= 0, got {retries}")
        if retry_backoff_s < 0:
            raise DataError(f"data.retry_backoff_s must be >= 0, got {retry_backoff_s}")
        readers = world_size * streams_per_rank
        if len(urls) < readers:
            raise DataError(
                f"{where}: {len(urls)} shard(s) cannot feed {world_size} rank(s) x {streams_per_rank} stream(s) per "
                f"rank = {readers} readers; write more, smaller shards (`mmssl make-shards --shard-size`) or lower "
                f"data.streams_per_rank"
            )
        missing = sorted(set(fields) - set(decoders))
        if missing:
            raise DataError(f"{where}: no decoder for modality {missing[0]!r}")
        if batch_size < 1:
            raise DataError(f"{where}: batch_size must be >= 1, got {batch_size}")
        self.urls = list(urls)
        self.fields = {m: tuple(exts) for m, exts in fields.items()}
        self.decoders = dict(decoders)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.streams_per_rank = streams_per_rank
        self.start_batch = start_batch
        self.where = where
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self._stats: Counter[str] = Counter()

    # ----------------------------------------------------------------------------------------------- ordering
    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.urls)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def stream_shards(self, stream: int, epoch: int) -> list[str]:
        """The shards virtual stream ``stream`` of this rank reads in ``epoch``, in order."""
        g = self.rank * self.streams_per_rank + stream
        readers = self.world_size * self.streams_per_rank
        return [self.urls[i] for i in self.shard_order(epoch)[g::readers]]

    def _raw_samples(self, stream: int) -> Iterator[RawSample]:
        epoch, empty_epochs = 0, 0
        while True:
            produced = 0
            for url in self.stream_shards(stream, epoch):
                for sample in self._read_shard(url):
                    produced += 1
                    yield RawSample(
                        key=sample["__key__"],
                        url=url,
                        epoch=epoch,
                        members={k: v for k, v in sample.items() if not k.startswith("__")},
                    )
            empty_epochs = empty_epochs + 1 if produced == 0 else 0
            if empty_epochs >= 2:
                raise DataError(f"{self.where}: stream {stream} of rank {self.rank} read no sample in two epochs")
            epoch += 1

    def _read_shard(self, url: str) -> Iterator[dict[str, Any]]:
        attempts = 1 + (self.retries if is_remote(url) else 0)
        for attempt in range(1, attempts + 1):
            failures: list[Exception] = []

            def handler(exc: Exception, failures: list[Exception] = failures) -> bool:
                failures.append(exc)
                return False  # a tar stream cannot be re-synchronised after a read error: stop this shard

            opened = wds.tariterators.url_opener([{"url": url}], handler=handler)
            files = wds.tariterators.tar_file_expander(opened, handler=handler, eof_value=None)
            produced = 0
            for sample in wds.tariterators.group_by_keys(files, handler=handler):
                produced += 1
                yield sample
            if not failures:
                return
            exc = failures[0]
            message = exc.args[0] if exc.args else exc
            if produced == 0 and is_remote(url):
                if attempt < attempts:
                    delay = self.retry_backoff_s * 2 ** (attempt - 1)
                    log.warning("%s: shard %s unreachable (attempt %d of %d): %s: %s; retrying in %.2fs",
                                self.where, url, attempt, attempts, type(exc).__name__, message, delay)
                    time.sleep(delay)
                    continue
                self._stats["unreachable_shards"] += 1
                log.warning("%s: skipping unreachable shard %s after %d attempt(s): %s: %s", self.where, url,
                            attempts, type(exc).__name__, message)
                return
            unreadable = isinstance(exc, OSError) and not isinstance(exc, tarfile.TarError)
            self._stats["unreadable_shards" if unreadable else "tar_errors"] += 1
            log.warning("%s: skipping the rest of shard %s: %s: %s", self.where, url, type(exc).__name__, message)
            return

    def _shuffled(self, stream: int) -> Iterator[RawSample]:
        raw = self._raw_samples(stream)
        if self.shuffle_buffer <= 1:
            yield from raw
            return
        rng = random.Random(f"{self.seed}:{self.rank}:{stream}")
        buffer: list[RawSample] = []
        for item in raw:
            buffer.append(item)
            if len(buffer) < self.shuffle_buffer:
                continue
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()

    # ----------------------------------------------------------------------------------------------- decoding
    def decode(self, raw: RawSample) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, raw.epoch, zlib.crc32(raw.key.encode())])
        sample: dict[str, Any] = {"__key__": raw.key, "__meta__": {}}
        if META_EXTENSION in raw.members:
            try:
                sample["__meta__"] = json.loads(raw.members[META_EXTENSION])
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                self._stats["decode_errors"] += 1
                log.warning("%s: shard %s sample %s: bad .json member: %s", self.where, raw.url, raw.key, exc)
        for modality, exts in self.fields.items():
            ext = next((e for e in exts if e in raw.members), None)
            if ext is None:
                sample[modality] = None
                continue
            try:
                sample[modality] = self.decoders[modality](raw.members[ext], rng)
            except Exception as exc:  # a corrupt member must never stop the run: count it, mark it absent
                self._stats["decode_errors"] += 1
                log.warning(
                    "%s: shard %s sample %s: .%s (%s) failed to decode: %s: %s",
                    self.where, raw.url, raw.key, ext, modality, type(exc).__name__, exc,
                )
                sample[modality] = None
        return sample

    def _take_stats(self) -> dict[str, int]:
        stats, self._stats = dict(self._stats), Counter()
        return stats

    # ----------------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if self.streams_per_rank % workers:
            raise DataError(
                f"{self.where}: {workers} DataLoader workers must divide data.streams_per_rank="
                f"{self.streams_per_rank}"
            )
        streams: dict[int, Iterator[RawSample]] = {}
        b = self.start_batch + worker
        while True:
            v, n = b % self.streams_per_rank, b // self.streams_per_rank
            if v not in streams:
                streams[v] = self._shuffled(v)
                for _ in range(n * self.batch_size):  # fast-forward: read, do not decode
                    next(streams[v])
            raws = [next(streams[v]) for _ in range(self.batch_size)]
            samples = [self.decode(r) for r in raws]
            yield collate(samples, list(self.fields), index=b, stats=self._take_stats())
            b += workers


def read_once(
    urls: Sequence[str],
    *,
    fields: Mapping[str, Sequence[str]],
    decoders: Mapping[str, Decoder],
    batch_size: int,
    where: str = "shards",
) -> Iterator[Batch]:
    """Every sample of ``urls`` exactly once, in shard order, in batches (the last one may be smaller): the
    evaluation reader (feature extraction, retrieval). Faults are skipped and counted as in training."""
    stream = ShardStream(urls, fields=fields, decoders=decoders, batch_size=batch_size, where=where)
    pending: list[dict[str, Any]] = []
    index = 0
    for url in stream.urls:
        for sample in stream._read_shard(url):
            # a full batch waits for the next sample, so a fault counted after its last sample (a shard that
            # ends in an error, an unreachable last URL) still reaches a batch's stats
            if len(pending) == batch_size:
                yield collate(pending, list(stream.fields), index=index, stats=stream._take_stats())
                pending, index = [], index + 1
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            pending.append(stream.decode(RawSample(key=sample["__key__"], url=url, epoch=0, members=members)))
    if pending:
        yield collate(pending, list(stream.fields), index=index, stats=stream._take_stats())


def _single_threaded_worker(_: int) -> None:
    # Decoding is per-sample work; intra-op threads in every worker would oversubscribe the cores the training
    # process needs (on 2 cores, spinning OpenMP threads tripled the step time).
    torch.set_num_threads(1)


def make_loader(stream: ShardStream, *, num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False):
    """A DataLoader over `ShardStream` that decodes in ``num_workers`` processes and yields batches in order."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=pin_memory,
        in_order=True,
        worker_init_fn=_single_threaded_worker if num_workers > 0 else None,
    )

"""Every sample of a shard set once, in order, decoded in worker processes: the parallel twin of
`data_pipelines.stream.read_once`.

This process reads the shards (tar parsing only, one pass over the bytes) and cuts the raw samples into batches
with ``read_once``'s own `raw_batches`; ``workers`` forked processes decode and collate the batches; the batches
come back in order. A bounded window (``2 · workers`` batches in flight) keeps memory bounded by the batch, not
the data set.

The result equals ``read_once``'s batch for batch: the same samples in the same order, the same batch boundaries,
the same decoded tensors (decoders are seeded per sample, `data_pipelines.reader.SampleDecoder`) and the same
``stats``: a reader fault (unreadable shard, tar error) is counted in the batch that was filling when it occurred,
a decode fault in its sample's batch: both decode with `decode_raw_batch`.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from mmssl.data_pipelines.batch import Batch
from mmssl.data_pipelines.reader import Decoder, FaultLog, SampleDecoder
from mmssl.data_pipelines.stream import RawBatch, decode_raw_batch, raw_batches, read_once
from mmssl.tools.errors import ToolError

_DECODER: SampleDecoder | None = None
_FIELDS: list[str] = []


def _init_worker(fields: Mapping[str, Sequence[str]], decoders: Mapping[str, Decoder], where: str) -> None:
    global _DECODER, _FIELDS
    torch.set_num_threads(1)  # k decoding processes must not each spin a full intra-op thread pool
    _DECODER = SampleDecoder(fields, decoders, seed=0, where=where, faults=FaultLog())
    _FIELDS = list(fields)


def _decode_batch(job: RawBatch) -> Batch:
    assert _DECODER is not None
    return decode_raw_batch(job, _DECODER, _FIELDS)


class OrderedBatches:
    """Iterate over the batches of ``urls`` (see the module docstring); ``workers <= 1`` is ``read_once`` itself.
    The worker pool starts in the constructor (before any progress bar's thread) and ends with `close` or the
    ``with`` block."""

    def __init__(self, urls: Sequence[str], *, fields: Mapping[str, Sequence[str]], decoders: Mapping[str, Decoder],
                 batch_size: int, where: str, workers: int = 0) -> None:
        self.urls, self.fields, self.decoders = list(urls), fields, decoders
        self.batch_size, self.where, self.workers = batch_size, where, workers
        self.pool: Any = None
        if workers > 1:
            if "fork" not in mp.get_all_start_methods():
                raise ToolError(f"--workers {workers}: decoding workers are forked, and this platform cannot fork; "
                                "use --workers 0")
            self.pool = mp.get_context("fork").Pool(workers, initializer=_init_worker,
                                                    initargs=(dict(fields), dict(decoders), where))

    def __iter__(self) -> Iterator[Batch]:
        if self.pool is None:
            yield from read_once(self.urls, fields=self.fields, decoders=self.decoders, batch_size=self.batch_size,
                                 where=self.where)
            return
        window: deque[Any] = deque()
        for job in raw_batches(self.urls, self.batch_size, self.where):
            window.append(self.pool.apply_async(_decode_batch, (job,)))
            if len(window) >= 2 * self.workers:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> OrderedBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

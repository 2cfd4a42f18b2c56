"""A deterministic, resumable, multi-source webdataset stream that yields `Batch` objects.

How the sample order is defined (and why it survives a restart exactly):

* Each rank reads ``streams_per_rank`` (V) independent *virtual streams*; virtual stream ``v`` of rank ``r`` is
  reader ``g = r·V + v`` of ``R = world·V``. Which shards (or shard ranges) a reader reads in each epoch is set by
  ``sampling`` (`data_pipelines.epochs`: continuous, exact, resampled) from ``seed`` alone.
* With several `Source` s (weighted mixing, FLAVA-style paired + unpaired data), each sample slot of a stream picks
  its source with probability ``w_s / Σw`` from ``Random(f"{seed}:mix:{g}")``; each source is read by its own cursor.
  A source's ``modalities`` restrict what its samples carry (others are absent), so objectives see only the samples
  that have their modalities (``Batch.present``).
* Each virtual stream has a shuffle buffer (size ``shuffle_buffer``) driven by ``Random(f"{seed}:{rank}:{v}")``
  and cuts its shuffled samples into batches of ``batch_size``.
* The rank's batch number ``b`` comes from stream ``b mod V`` (its ``b // V``-th batch). DataLoader worker ``w`` of
  ``k`` produces batches ``start + w, start + w + k, ...``; the DataLoader returns them in order, for any ``k`` that
  divides V.
* Per-sample randomness (augmentation) is seeded by ``(seed, epoch, crc32(key))``, not by a worker's RNG.

**Stream position.** Every batch carries ``position``: the state of its virtual stream right after it — per source
cursor ``(epoch, segment, sample offset)``, the mixing and shuffle RNG states, the samples held in the shuffle buffer
(as references ``(source, epoch, segment, offset)``), the row within an exact epoch. A checkpoint stores the last
position of each of the rank's V streams (`pretrain.checkpoint`); resuming re-opens each cursor's shard at its offset
and re-reads only the buffered samples, so a resume costs at most a shuffle buffer of reading, not the epoch so far,
and continues with exactly the samples that came next, on any worker count dividing V (the same world size). With no
recorded position, a stream replays its raw samples (read, not decoded) up to the batch asked for.

A batch always carries every modality the stream reads (rows without it are zeros, marked absent), so every rank
runs every tower each step. Faults never stop the stream (`data_pipelines.reader`): they are counted in
``Batch.stats`` and listed in ``Batch.faults``; per-source row counts are ``stats["source_rows/<name>"]`` and exact
epochs' padding rows ``stats["padding_rows"]``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmssl.data_pipelines.batch import Batch, TensorTree, collate, zeros_like_tree
from mmssl.data_pipelines.cursors import Source, VirtualStream
from mmssl.data_pipelines.epochs import SAMPLINGS, exact_batches_per_epoch, shard_order
from mmssl.data_pipelines.reader import Decoder, FaultLog, RawSample, SampleDecoder, ShardReader
from mmssl.data_pipelines.shards import DataError, shard_sizes

log = logging.getLogger("mmssl.data")

PAD_KEY = ""


class ShardStream(IterableDataset):
    """Batches of decoded samples from webdataset shards; see the module docstring for the order it defines.

    Args:
        urls: shard URLs of a single source (local paths, ``pipe:`` commands, http URLs); or pass ``sources``.
        fields: batch key (modality) -> shard member extensions to read it from (the first one a sample has wins).
        decoders: batch key -> `Decoder`.
        batch_size: samples per batch (per rank).
        rank, world_size: this rank and the number of ranks that split the shards.
        seed: defines the shard order, mixing, shuffle buffers and per-sample augmentation.
        shuffle_buffer: size of each virtual stream's sample shuffle buffer (0 or 1: no sample shuffle).
        streams_per_rank: virtual streams per rank (V); DataLoader workers must divide it.
        start_batch: index of the first batch to yield (resume position).
        positions: virtual stream -> its recorded position (``Batch.position``) at ``start_batch``.
        sources: several weighted `Source` s instead of ``urls``.
        sampling: ``continuous``, ``exact`` or ``resampled`` (`data_pipelines.epochs`).
        where: the origin of ``urls`` (recipe key or CLI flag) for error messages.
        retries, retry_backoff_s: for remote shards that fail before their first sample (`ShardReader`).
    """

    def __init__(
        self,
        urls: Sequence[str] | None = None,
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
        positions: Mapping[int, Mapping[str, Any]] | None = None,
        sources: Sequence[Source] | None = None,
        sampling: str = "continuous",
        where: str = "shards",
        retries: int = 3,
        retry_backoff_s: float = 1.0,
    ) -> None:
        super().__init__()
        if sources is None:
            sources = [Source("train", tuple(urls or ()), where=where)]
        if sampling not in SAMPLINGS:
            raise DataError(f"data.sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if batch_size < 1:
            raise DataError(f"{where}: batch_size must be >= 1, got {batch_size}")
        self.faults = FaultLog()
        self.reader = ShardReader(where=where, retries=retries, retry_backoff_s=retry_backoff_s, faults=self.faults)
        self.decode = SampleDecoder(fields, decoders, seed=seed, where=where, faults=self.faults)
        readers = world_size * streams_per_rank
        checked = []
        for s in sources:
            if not s.urls:
                raise DataError(f"{s.where}: no shards")
            if not s.weight > 0:
                raise DataError(f"{s.where}: weight must be > 0, got {s.weight}")
            unknown = sorted(set(s.modalities or ()) - set(fields))
            if unknown:
                raise DataError(f"{s.where}: modality {unknown[0]!r} is not read by this run (reads {sorted(fields)})")
            if sampling == "continuous" and len(s.urls) < readers:
                raise DataError(
                    f"{s.where}: {len(s.urls)} shard(s) cannot feed {world_size} rank(s) x {streams_per_rank} "
                    f"stream(s) per rank = {readers} readers; write more, smaller shards (`mmssl make-shards "
                    f"--shard-size`), lower data.streams_per_rank, or use data.sampling: exact or resampled")
            if sampling == "exact" and s.sizes is None:
                sizes = shard_sizes(list(s.urls))
                if sizes is None:
                    raise DataError(f"{s.where}: data.sampling=exact needs samples per shard, from an index.json "
                                    f"beside the shards; write one with `mmssl index-shards DIR` (a directory of "
                                    f"tars, e.g. img2dataset's output) or build the shards with `mmssl make-shards`")
                s = Source(s.name, s.urls, s.weight, s.modalities, sizes, s.where)
            checked.append(s)
        if sampling == "exact" and len(checked) > 1:
            raise DataError("data.sampling=exact reads one shard set per epoch; mix several data.sources with "
                            "data.sampling: continuous or resampled")
        self.sources = checked
        self.fields = list(fields)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.shuffle_buffer, self.streams_per_rank, self.sampling = shuffle_buffer, streams_per_rank, sampling
        self.start_batch, self.where = start_batch, where
        self.positions = {int(v): p for v, p in (positions or {}).items()}
        self.exact_batches = 0
        if sampling == "exact":
            sizes = checked[0].sizes or {}
            self.exact_batches = exact_batches_per_epoch(sum(sizes[u] for u in checked[0].urls), readers, batch_size)
        self._templates: dict[str, TensorTree] = {}

    @property
    def urls(self) -> list[str]:
        return [u for s in self.sources for u in s.urls]

    def shard_order(self, epoch: int) -> list[int]:
        return shard_order(len(self.sources[0].urls), self.seed, epoch)

    def batches_per_epoch(self) -> int | None:
        """Batches per rank in one exact epoch (``V·P``); None unless ``sampling="exact"``."""
        return self.exact_batches * self.streams_per_rank if self.sampling == "exact" else None

    # ----------------------------------------------------------------------------------------------- batches
    def _open(self, v: int, n: int) -> VirtualStream:
        state = self.positions.get(v)
        if state is not None:
            if int(state["batches"]) != n:
                raise DataError(f"{self.where}: the recorded position of stream {v} is after batch "
                                f"{state['batches']} of it, but batch {n} is asked for")
            return self._virtual(v, state)
        stream = self._virtual(v, None)
        for _ in range(n):  # no recorded position: replay (read, not decoded)
            stream.take_batch(self.batch_size)
        self.faults.take()  # faults met while replaying were reported by the run that first read them
        return stream

    def _virtual(self, v: int, state: Mapping[str, Any] | None) -> VirtualStream:
        return VirtualStream(self.sources, sampling=self.sampling, seed=self.seed, rank=self.rank, v=v,
                             streams_per_rank=self.streams_per_rank, world_size=self.world_size,
                             shuffle_buffer=self.shuffle_buffer, epoch_rows=self.exact_batches * self.batch_size,
                             reader=self.reader, state=state)

    def _template(self, key: str) -> TensorTree | None:
        """Zeros shaped like ``key`` 's decoded input (from the first sample that has it), so a batch where no row
        carries ``key`` still has the tensor (all rows absent) and every rank runs every tower."""
        if key in self._templates:
            return self._templates[key]
        quiet = FaultLog()
        decode = SampleDecoder({key: self.decode.fields[key]}, {key: self.decode.decoders[key]}, seed=self.seed,
                               where=self.where, faults=quiet)
        reader = ShardReader(where=self.where, retries=0, faults=quiet)
        for source in self.sources:  # any source's member gives the shape, even one that may not use it
            for url in source.urls:
                for _, sample in reader.samples(url):
                    members = {k: v for k, v in sample.items() if not k.startswith("__")}
                    value = decode(RawSample(sample["__key__"], url, 0, members))[key]
                    if value is not None:
                        self._templates[key] = zeros_like_tree(value)
                        return self._templates[key]
        return None

    def _decode_rows(self, rows: list[RawSample | None]) -> tuple[list[dict[str, Any]], dict[str, int]]:
        samples, counts = [], {}
        by_name = {s.name: s for s in self.sources}
        for raw in rows:
            if raw is None:
                samples.append({"__key__": PAD_KEY, "__meta__": {}})
                counts["padding_rows"] = counts.get("padding_rows", 0) + 1
                continue
            samples.append(self.decode(raw, by_name[raw.source].modalities))
            counts[f"source_rows/{raw.source}"] = counts.get(f"source_rows/{raw.source}", 0) + 1
        return samples, counts

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if self.streams_per_rank % workers:
            raise DataError(f"{self.where}: {workers} DataLoader workers must divide data.streams_per_rank="
                            f"{self.streams_per_rank}")
        streams: dict[int, VirtualStream] = {}
        b = self.start_batch + worker
        while True:
            v, n = b % self.streams_per_rank, b // self.streams_per_rank
            if v not in streams:
                streams[v] = self._open(v, n)
            stream = streams[v]
            samples, rows = self._decode_rows(stream.take_batch(self.batch_size))
            templates = {}
            for key in self.fields:
                if all(s.get(key) is None for s in samples) and (t := self._template(key)) is not None:
                    templates[key] = t
            counts, faults = self.faults.take()
            yield collate(samples, self.fields, index=b, stats={**counts, **rows}, templates=templates,
                          faults=faults, position={"stream": v, **stream.state()})
            b += workers


RawBatch = tuple[int, list[RawSample], dict[str, int], list[dict[str, str]]]  # index, samples, reader faults


def raw_batches(urls: Sequence[str], batch_size: int, where: str) -> Iterator[RawBatch]:
    """Every raw sample of ``urls`` once, in shard order, cut into batches of ``batch_size`` (the last may be
    smaller), each with the reader faults counted while it filled. A full batch waits for the next sample, so a
    fault counted after its last sample (a shard that ends in an error, an unreachable last URL) still reaches it."""
    faults = FaultLog()
    reader = ShardReader(where=where, faults=faults)
    pending: list[RawSample] = []
    index = 0
    for url in urls:
        for _, sample in reader.samples(url):
            if len(pending) == batch_size:
                counts, found = faults.take()
                yield index, pending, counts, found
                pending, index = [], index + 1
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            pending.append(RawSample(key=sample["__key__"], url=url, epoch=0, members=members))
    if pending:
        counts, found = faults.take()
        yield index, pending, counts, found


def decode_raw_batch(job: RawBatch, decode: SampleDecoder, fields: Sequence[str]) -> Batch:
    """A `raw_batches` batch decoded and collated; its stats and fault records are the reader's, then the
    decoder's (``decode.faults``, emptied here)."""
    index, raws, counts, found = job
    samples = [decode(raw) for raw in raws]
    decode_counts, decode_found = decode.faults.take()
    stats = dict(counts)
    for k, v in decode_counts.items():
        stats[k] = stats.get(k, 0) + v
    return collate(samples, list(fields), index=index, stats=stats, faults=[*found, *decode_found])


def read_once(
    urls: Sequence[str],
    *,
    fields: Mapping[str, Sequence[str]],
    decoders: Mapping[str, Decoder],
    batch_size: int,
    where: str = "shards",
) -> Iterator[Batch]:
    """Every sample of ``urls`` exactly once, in shard order, in batches (the last one may be smaller): the
    evaluation reader (feature extraction, retrieval). Faults are skipped, counted and listed as in training."""
    decode = SampleDecoder(fields, decoders, seed=0, where=where, faults=FaultLog())
    for job in raw_batches(urls, batch_size, where):
        yield decode_raw_batch(job, decode, list(fields))


def _single_threaded_worker(_: int) -> None:
    # Decoding is per-sample work; intra-op threads in every worker would oversubscribe the cores the training
    # process needs (on 2 cores, spinning OpenMP threads tripled the step time).
    torch.set_num_threads(1)


def make_loader(stream: ShardStream, *, num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False):
    """A DataLoader over `ShardStream` that decodes in ``num_workers`` processes and yields batches in order;
    ``prefetch_factor`` batches per worker are decoded ahead; ``pin_memory`` (on GPUs) page-locks each batch so the
    host-to-device copy (``non_blocking``) overlaps the step."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=pin_memory,
        in_order=True,
        worker_init_fn=_single_threaded_worker if num_workers > 0 else None,
    )

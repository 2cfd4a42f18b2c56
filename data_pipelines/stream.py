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
import random
from bisect import bisect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipelines.batch import Batch, TensorTree, collate, zeros_like_tree
from data_pipelines.epochs import SAMPLINGS, Segment, exact_batches_per_epoch, reader_segments, shard_order
from data_pipelines.reader import Decoder, FaultLog, RawSample, SampleDecoder, ShardReader
from data_pipelines.shards import DataError, shard_sizes

log = logging.getLogger("mmssl.data")

PAD_KEY = ""


@dataclass(frozen=True)
class Source:
    """One shard set of a run. ``modalities``: the batch keys its samples may fill (None: every one the stream
    reads); ``sizes``: samples per shard (from ``index.json``; needed by exact sampling); ``where``: its recipe key."""

    name: str
    urls: tuple[str, ...]
    weight: float = 1.0
    modalities: tuple[str, ...] | None = None
    sizes: Mapping[str, int] | None = None
    where: str = "data.train"


class SourceCursor:
    """Reads one source's samples for one reader, epoch after epoch; ``position`` says where it stands."""

    def __init__(self, source: Source, index: int, *, reader: ShardReader, sampling: str, seed: int, reader_id: int,
                 readers: int, position: Sequence[int | None] = (0, 0, None)) -> None:
        self.source, self.index, self.reader = source, index, reader
        self.sampling, self.seed, self.reader_id, self.readers = sampling, seed, reader_id, readers
        self.epoch, self.segment, self.offset = int(position[0]), int(position[1]), position[2]  # type: ignore[arg-type]
        self._segments: dict[int, list[Segment]] = {}
        self._samples: Iterator[tuple[int, dict[str, Any]]] | None = None
        self._empty_epochs = 0
        self._read_this_epoch = 0

    @property
    def position(self) -> list[int | None]:
        return [self.epoch, self.segment, self.offset]

    def segments(self, epoch: int) -> list[Segment]:
        if epoch not in self._segments:
            self._segments = {epoch: reader_segments(self.source.urls, sampling=self.sampling, seed=self.seed,
                                                     epoch=epoch, reader=self.reader_id, readers=self.readers,
                                                     sizes=self.source.sizes)}
        return self._segments[epoch]

    def next(self, *, auto_advance: bool = True) -> RawSample | None:
        """The next sample; at an epoch's end either move on (``auto_advance``) or return None (exact epochs)."""
        while True:
            segments = self.segments(self.epoch)
            if self.segment >= len(segments):
                if not auto_advance:
                    return None
                self.end_epoch()
                continue
            if self._samples is None:
                seg = segments[self.segment]
                start = seg.start if self.offset is None else self.offset
                self._samples = self.reader.samples(seg.url, start, seg.stop)
            item = next(self._samples, None)
            if item is None:
                self.segment, self.offset, self._samples = self.segment + 1, None, None
                continue
            offset, sample = item
            self.offset = offset + 1
            self._read_this_epoch += 1
            url = segments[self.segment].url
            return RawSample(key=sample["__key__"], url=url, epoch=self.epoch,
                             members={k: v for k, v in sample.items() if not k.startswith("__")},
                             ref=(self.index, self.epoch, self.segment, offset), source=self.source.name)

    def end_epoch(self) -> None:
        self._empty_epochs = self._empty_epochs + 1 if self._read_this_epoch == 0 else 0
        if self._empty_epochs >= 2:
            raise DataError(f"{self.source.where}: reader {self.reader_id} read no sample in two epochs")
        self.epoch, self.segment, self.offset, self._samples, self._read_this_epoch = self.epoch + 1, 0, None, None, 0

    def fetch(self, refs: Sequence[tuple[int, int, int, int]]) -> dict[tuple[int, int, int, int], RawSample]:
        """Re-read the samples ``refs`` point at (a restored shuffle buffer), one pass per segment."""
        wanted: dict[tuple[int, int], set[int]] = {}
        for _, epoch, seg, offset in refs:
            wanted.setdefault((epoch, seg), set()).add(offset)
        found: dict[tuple[int, int, int, int], RawSample] = {}
        quiet = ShardReader(where=self.reader.where, retries=self.reader.retries,
                            retry_backoff_s=self.reader.retry_backoff_s)  # faults were reported the first time
        for (epoch, seg), offsets in wanted.items():
            segment = reader_segments(self.source.urls, sampling=self.sampling, seed=self.seed, epoch=epoch,
                                      reader=self.reader_id, readers=self.readers, sizes=self.source.sizes)[seg]
            for offset, sample in quiet.samples(segment.url, min(offsets), max(offsets) + 1):
                if offset in offsets:
                    ref = (self.index, epoch, seg, offset)
                    found[ref] = RawSample(key=sample["__key__"], url=segment.url, epoch=epoch, ref=ref,
                                           members={k: v for k, v in sample.items() if not k.startswith("__")},
                                           source=self.source.name)
        return found


class VirtualStream:
    """One reader's sequence of rows (raw samples, or None for exact-epoch padding) and its resumable state."""

    def __init__(self, stream: ShardStream, v: int, reader: ShardReader, state: Mapping[str, Any] | None) -> None:
        g = stream.rank * stream.streams_per_rank + v
        readers = stream.world_size * stream.streams_per_rank
        self.exact = stream.sampling == "exact"
        self.buffer_size = max(1, stream.shuffle_buffer)
        self.epoch_rows = stream.exact_batches * stream.batch_size if self.exact else 0
        self.cursors = [SourceCursor(s, i, reader=reader, sampling=stream.sampling, seed=stream.seed, reader_id=g,
                                     readers=readers) for i, s in enumerate(stream.sources)]
        weights = [s.weight for s in stream.sources]
        self.cumulative = [sum(weights[: i + 1]) for i in range(len(weights))]
        self.mix_rng = random.Random(f"{stream.seed}:mix:{g}") if len(self.cursors) > 1 else None
        self.shuffle_rng = random.Random(f"{stream.seed}:{stream.rank}:{v}")
        self.buffer: list[RawSample] = []
        self.row, self.draining, self.batches = 0, False, 0
        if state is not None:
            self._restore(state)

    def _draw(self) -> RawSample | None:
        s = 0
        if self.mix_rng is not None:
            s = min(bisect(self.cumulative, self.mix_rng.random() * self.cumulative[-1]), len(self.cursors) - 1)
        return self.cursors[s].next(auto_advance=not self.exact)

    def _pop(self) -> RawSample:
        if self.buffer_size > 1:
            i = self.shuffle_rng.randrange(len(self.buffer))
            self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()

    def next_row(self) -> RawSample | None:
        while not self.draining and len(self.buffer) < self.buffer_size:
            raw = self._draw()
            if raw is None:
                self.draining = True
            else:
                self.buffer.append(raw)
        row = self._pop() if self.buffer else None
        if self.exact:
            self.row += 1
            if self.row == self.epoch_rows:  # every sample of the epoch was emitted (n_g <= P·B)
                self.cursors[0].end_epoch()
                self.row, self.draining = 0, False
        return row

    def take_batch(self, batch_size: int) -> list[RawSample | None]:
        rows = [self.next_row() for _ in range(batch_size)]
        self.batches += 1
        return rows

    def state(self) -> dict[str, Any]:
        return {"batches": self.batches, "cursors": [c.position for c in self.cursors],
                "mix_rng": _rng_state(self.mix_rng), "shuffle_rng": _rng_state(self.shuffle_rng),
                "buffer": [list(r.ref) for r in self.buffer], "row": self.row, "draining": self.draining}

    def _restore(self, state: Mapping[str, Any]) -> None:
        if len(state["cursors"]) != len(self.cursors):
            raise DataError(f"the stream position has {len(state['cursors'])} source(s), the recipe "
                            f"{len(self.cursors)}: resume needs the same data sources")
        for cursor, position in zip(self.cursors, state["cursors"], strict=True):
            cursor.epoch, cursor.segment, cursor.offset = position
        if self.mix_rng is not None:
            self.mix_rng.setstate(_as_rng_state(state["mix_rng"]))
        self.shuffle_rng.setstate(_as_rng_state(state["shuffle_rng"]))
        refs = [tuple(r) for r in state["buffer"]]
        found: dict[tuple[int, int, int, int], RawSample] = {}
        for cursor in self.cursors:
            found.update(cursor.fetch([r for r in refs if r[0] == cursor.index]))  # type: ignore[misc]
        missing = [r for r in refs if r not in found]
        if missing:
            raise DataError(f"cannot restore the shuffle buffer: sample {missing[0]} of the stream position is no "
                            f"longer in its shard (were the shards rewritten since the checkpoint?)")
        self.buffer = [found[r] for r in refs]  # type: ignore[index]
        self.row, self.draining, self.batches = int(state["row"]), bool(state["draining"]), int(state["batches"])


def _rng_state(rng: random.Random | None) -> list[Any] | None:
    if rng is None:
        return None
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _as_rng_state(state: Sequence[Any]) -> tuple[Any, ...]:
    return (state[0], tuple(state[1]), state[2])


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
                    raise DataError(f"{s.where}: data.sampling=exact needs samples per shard; point it at a dataset "
                                    f"directory or index.json written by `mmssl make-shards`")
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
            return VirtualStream(self, v, self.reader, state)
        stream = VirtualStream(self, v, self.reader, None)
        for _ in range(n):  # no recorded position: replay (read, not decoded)
            stream.take_batch(self.batch_size)
        self.faults.take()  # faults met while replaying were reported by the run that first read them
        return stream

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
    faults = FaultLog()
    reader = ShardReader(where=where, faults=faults)
    decode = SampleDecoder(fields, decoders, seed=0, where=where, faults=faults)
    pending: list[dict[str, Any]] = []
    index = 0
    for url in urls:
        for _, sample in reader.samples(url):
            # a full batch waits for the next sample, so a fault counted after its last sample (a shard that
            # ends in an error, an unreachable last URL) still reaches a batch's stats
            if len(pending) == batch_size:
                counts, found = faults.take()
                yield collate(pending, list(fields), index=index, stats=counts, faults=found)
                pending, index = [], index + 1
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            pending.append(decode(RawSample(key=sample["__key__"], url=url, epoch=0, members=members)))
    if pending:
        counts, found = faults.take()
        yield collate(pending, list(fields), index=index, stats=counts, faults=found)


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

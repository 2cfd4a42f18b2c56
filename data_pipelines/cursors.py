"""The state machines behind a stream's sample order: one `SourceCursor` per (source, reader) and one
`VirtualStream` per reader, both with a position that a checkpoint stores and a resume restores
(`data_pipelines.stream` explains the order they define).

A `VirtualStream` draws rows from its sources' cursors (weighted, seeded), through a seeded shuffle buffer; in exact
epochs it drains the buffer at the epoch's end and pads the epoch to ``P·B`` rows with ``None``. Its `state` is
plain JSON: per cursor ``[epoch, segment, sample offset]``, the mixing and shuffle RNG states, the buffered samples as
references ``[source, epoch, segment, offset]``, the row within an exact epoch; restoring re-opens each cursor's
shard at its offset and re-reads only the buffered samples.
"""

from __future__ import annotations

import random
from bisect import bisect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmssl.data_pipelines.epochs import Segment, reader_segments
from mmssl.data_pipelines.reader import RawSample, ShardReader
from mmssl.data_pipelines.shards import DataError


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

    def __init__(self, sources: Sequence[Source], *, sampling: str, seed: int, rank: int, v: int,
                 streams_per_rank: int, world_size: int, shuffle_buffer: int, epoch_rows: int, reader: ShardReader,
                 state: Mapping[str, Any] | None = None) -> None:
        g = rank * streams_per_rank + v
        readers = world_size * streams_per_rank
        self.exact = sampling == "exact"
        self.buffer_size = max(1, shuffle_buffer)
        self.epoch_rows = epoch_rows  # rows per exact epoch (P·B); 0 otherwise
        self.cursors = [SourceCursor(s, i, reader=reader, sampling=sampling, seed=seed, reader_id=g,
                                     readers=readers) for i, s in enumerate(sources)]
        weights = [s.weight for s in sources]
        self.cumulative = [sum(weights[: i + 1]) for i in range(len(weights))]
        self.mix_rng = random.Random(f"{seed}:mix:{g}") if len(self.cursors) > 1 else None
        self.shuffle_rng = random.Random(f"{seed}:{rank}:{v}")
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

"""Reading shards sample by sample, and decoding samples, without ever letting bad data stop a run.

`ShardReader` turns a shard URL (local path, ``pipe:`` command, http URL) into raw samples (key -> member bytes),
each with its position (sample offset) in the shard, so a stream can record where it stands and later re-open the
shard at that offset. `SampleDecoder` turns a raw sample into decoded modalities.

Every fault is kept, not just counted: a `Fault` names the shard, the sample key (when known), the member and the
error. They are logged, counted in ``stats`` and handed on with the batch, so a run reports exactly which samples
it skipped:

* a shard that cannot be opened, a truncated tar or a corrupt tar header ends that shard (a tar stream cannot be
  re-synchronised) — ``unreadable_shards`` / ``tar_errors``;
* a remote shard that fails before yielding its first sample is retried ``retries`` times after waiting
  ``retry_backoff_s · 2^(attempt-1)`` seconds, then skipped — ``unreachable_shards``; a failure after the first
  sample is not retried (that would re-yield samples);
* a member that fails to decode marks that modality absent in the sample — ``decode_errors``.
"""

from __future__ import annotations

import json
import logging
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import webdataset as wds

from mmssl.data_pipelines.batch import TensorTree
from mmssl.data_pipelines.shards import DataError, is_remote

log = logging.getLogger("mmssl.data")

Decoder = Callable[[bytes, np.random.Generator], TensorTree]
"""Turns one shard member's bytes into a tensor (tree); the generator drives any random augmentation."""

META_EXTENSION = "json"


@dataclass(frozen=True)
class RawSample:
    """One undecoded sample. ``ref`` locates it for resume: ``(source, epoch, segment, offset)`` in the stream that
    read it (`data_pipelines.stream`); ``offset`` is the sample's position in its shard."""

    key: str
    url: str
    epoch: int
    members: dict[str, bytes]
    ref: tuple[int, int, int, int] = (0, 0, 0, 0)
    source: str = ""


@dataclass(frozen=True)
class Fault:
    """A skipped piece of data: ``kind`` is the stats counter it was counted under."""

    kind: str
    shard: str
    key: str
    member: str
    error: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


class FaultLog:
    """Counters plus the fault records since the last `take` (what one batch carries)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        self.counts[fault.kind] += 1
        self.faults.append(fault)

    def take(self) -> tuple[dict[str, int], list[dict[str, str]]]:
        counts, faults = dict(self.counts), [f.as_dict() for f in self.faults]
        self.counts, self.faults = Counter(), []
        return counts, faults


class ShardReader:
    """Raw samples of one shard, with retries for remote shards; faults go to ``faults``."""

    def __init__(self, *, where: str, retries: int = 3, retry_backoff_s: float = 1.0,
                 faults: FaultLog | None = None) -> None:
        if retries < 0:
            raise DataError(f"data.retries must be >= 0, got {retries}")
        if retry_backoff_s < 0:
            raise DataError(f"data.retry_backoff_s must be >= 0, got {retry_backoff_s}")
        self.where, self.retries, self.retry_backoff_s = where, retries, retry_backoff_s
        self.faults = faults if faults is not None else FaultLog()

    def samples(self, url: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(offset, sample)`` for the samples of ``url`` at offsets ``start <= offset < stop``; the samples
        before ``start`` are read (a tar stream has no random access) but not returned."""
        for offset, sample in enumerate(self._read(url)):
            if stop is not None and offset >= stop:
                return
            if offset >= start:
                yield offset, sample

    def _read(self, url: str) -> Iterator[dict[str, Any]]:
        attempts = 1 + (self.retries if is_remote(url) else 0)
        for attempt in range(1, attempts + 1):
            failures: list[Exception] = []

            def handler(exc: Exception, failures: list[Exception] = failures) -> bool:
                failures.append(exc)
                return False  # a tar stream cannot be re-synchronised after a read error: stop this shard

            opened = wds.tariterators.url_opener([{"url": url}], handler=handler)
            files = wds.tariterators.tar_file_expander(opened, handler=handler, eof_value=None)
            produced, last_key = 0, ""
            for sample in wds.tariterators.group_by_keys(files, handler=handler):
                produced += 1
                last_key = sample["__key__"]
                yield sample
            if not failures:
                return
            exc = failures[0]
            message = f"{type(exc).__name__}: {exc.args[0] if exc.args else exc}"
            if produced == 0 and is_remote(url):
                if attempt < attempts:
                    delay = self.retry_backoff_s * 2 ** (attempt - 1)
                    log.warning("%s: shard %s unreachable (attempt %d of %d): %s; retrying in %.2fs",
                                self.where, url, attempt, attempts, message, delay)
                    time.sleep(delay)
                    continue
                self.faults.add(Fault("unreachable_shards", url, "", "", message))
                log.warning("%s: skipping unreachable shard %s after %d attempt(s): %s", self.where, url, attempts,
                            message)
                return
            unreadable = isinstance(exc, OSError) and not isinstance(exc, tarfile.TarError)
            after = f" after sample {last_key!r}" if last_key else ""
            self.faults.add(Fault("unreadable_shards" if unreadable else "tar_errors", url, last_key, "", message))
            log.warning("%s: skipping the rest of shard %s%s: %s", self.where, url, after, message)
            return


class SampleDecoder:
    """Decodes a `RawSample` into ``{"__key__", "__meta__", <modality>: tensor tree or None}``.

    ``fields`` maps each modality to the member extensions it may come from (the first one present wins);
    ``modalities`` (when given) restricts which of them this sample's source may fill. Per-sample randomness
    (augmentation) is seeded by ``(seed, epoch, crc32(key))``, never by a worker's RNG, so it does not depend on
    which worker decodes the sample.
    """

    def __init__(self, fields: Mapping[str, Sequence[str]], decoders: Mapping[str, Decoder], *, seed: int,
                 where: str, faults: FaultLog) -> None:
        missing = sorted(set(fields) - set(decoders))
        if missing:
            raise DataError(f"{where}: no decoder for modality {missing[0]!r}")
        self.fields = {m: tuple(exts) for m, exts in fields.items()}
        self.decoders = dict(decoders)
        self.seed, self.where, self.faults = seed, where, faults

    def __call__(self, raw: RawSample, modalities: Sequence[str] | None = None) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, raw.epoch, zlib.crc32(raw.key.encode())])
        sample: dict[str, Any] = {"__key__": raw.key, "__meta__": {}}
        if META_EXTENSION in raw.members:
            try:
                sample["__meta__"] = json.loads(raw.members[META_EXTENSION])
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                self.faults.add(Fault("decode_errors", raw.url, raw.key, META_EXTENSION, str(exc)))
                log.warning("%s: shard %s sample %s: bad .json member: %s", self.where, raw.url, raw.key, exc)
        for modality, exts in self.fields.items():
            ext = next((e for e in exts if e in raw.members), None)
            if ext is None or (modalities is not None and modality not in modalities):
                sample[modality] = None
                continue
            try:
                sample[modality] = self.decoders[modality](raw.members[ext], rng)
            except Exception as exc:  # a corrupt member must never stop the run: record it, mark it absent
                self.faults.add(Fault("decode_errors", raw.url, raw.key, ext, f"{type(exc).__name__}: {exc}"))
                log.warning("%s: shard %s sample %s: .%s (%s) failed to decode: %s: %s",
                            self.where, raw.url, raw.key, ext, modality, type(exc).__name__, exc)
                sample[modality] = None
        return sample

    def has(self, raw: RawSample, modality: str) -> bool:
        return any(e in raw.members for e in self.fields[modality])

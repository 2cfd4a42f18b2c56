"""A validation pass over a shard set: read every member of every sample, report what the loader would trip on.

For each local shard (a `resolve_shards` spec: a directory, its ``index.json``, a brace pattern):

* the tar is walked member by member and each member's data read in full. A read that runs out of file is a
  **truncated** shard; a header that does not parse is a **corrupt_tar** shard. Python's ``tarfile`` ends an archive
  quietly at a bad or missing header past the first member, so after the walk the bytes that follow must be the
  end-of-archive marker (two zero blocks, POSIX 1003.1): too few bytes is reported as truncated (cut at a member
  boundary), non-zero bytes as corrupt (the rest of the shard would never be read);
* members are grouped into samples as webdataset groups them (consecutive members sharing the name up to the first
  ``.`` of the file name). A member name without an extension, a repeated extension within a sample and a key seen
  before are reported (the loader drops, fails or duplicates them);
* ``.json`` members must parse (the stream parses metadata) and text members (``.txt``, ``.text``, ``.caption``)
  must be UTF-8; ``decoders`` (extension -> `data_pipelines.stream.Decoder`, e.g. the modality plug-ins' evaluation
  decoders) decode the members they cover: a failure is an **undecodable** member, with shard and key;
* per-extension member counts and byte totals are summed, and each shard's samples, bytes and per-extension sample
  counts are compared with the ``index.json`` next to it: a difference is an **index_mismatch**.

`InspectionReport.ok` is False when anything was reported (the CLI's exit code 1).
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmssl.data_pipelines.shard_plan import END_OF_ARCHIVE, split_member_name
from mmssl.data_pipelines.shards import INDEX_NAME, DataError, DatasetIndex, is_remote, resolve_shards

MemberDecoder = Callable[[bytes, np.random.Generator], Any]
TEXT_EXTENSIONS = ("txt", "text", "caption")


def _parse_json(data: bytes, rng: np.random.Generator) -> Any:
    return json.loads(data)


def _utf8(data: bytes, rng: np.random.Generator) -> Any:
    return data.decode("utf-8")


BUILTIN_CHECKS: dict[str, MemberDecoder] = {"json": _parse_json, **{e: _utf8 for e in TEXT_EXTENSIONS}}


@dataclass
class Problem:
    kind: str  # truncated | corrupt_tar | unreadable | undecodable | unkeyed_member | duplicate_member |
    # duplicate_key | index_mismatch
    shard: str
    key: str | None = None
    member: str | None = None  # the extension
    detail: str = ""


@dataclass
class ShardSummary:
    path: str
    samples: int = 0
    bytes: int = 0
    modalities: dict[str, int] = field(default_factory=dict)  # extension -> samples carrying it
    index_samples: int | None = None  # what index.json says, when it lists the shard


@dataclass
class ExtensionTotals:
    members: int = 0
    bytes: int = 0


@dataclass
class InspectionReport:
    spec: str
    shards: list[ShardSummary]
    extensions: dict[str, ExtensionTotals]
    problems: list[Problem]
    checked: list[str]  # extensions whose members were parsed / decoded

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def ok(self) -> bool:
        return not self.problems

    def bad_shards(self) -> list[str]:
        return sorted({p.shard for p in self.problems})

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "ok": self.ok, "total_samples": self.total_samples,
                "shards": [asdict(s) for s in self.shards],
                "extensions": {e: asdict(t) for e, t in sorted(self.extensions.items())},
                "problems": [asdict(p) for p in self.problems], "bad_shards": self.bad_shards(),
                "checked": list(self.checked)}


class _ShardReader:
    """Walks one shard, filling its summary, the per-extension totals and the problem list."""

    def __init__(self, path: str, checks: Mapping[str, MemberDecoder], report: InspectionReport,
                 seen_keys: dict[str, str]) -> None:
        self.path, self.checks, self.report, self.seen_keys = path, checks, report, seen_keys
        self.summary = ShardSummary(path=path)
        self.key: str | None = None
        self.sample_exts: set[str] = set()
        self.modalities: Counter[str] = Counter()

    def problem(self, kind: str, detail: str, key: str | None = None, member: str | None = None) -> None:
        self.report.problems.append(Problem(kind, self.path, key, member, detail))

    def read(self) -> ShardSummary:
        try:
            self.summary.bytes = Path(self.path).stat().st_size
            with open(self.path, "rb") as f:
                self._walk(f)
        except OSError as exc:
            self.problem("unreadable", f"{type(exc).__name__}: {exc}")
        self.summary.modalities = dict(self.modalities)
        return self.summary

    def _walk(self, f: Any) -> None:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 - wraps `f`, which `read` closes
        except tarfile.TarError as exc:
            self.problem("truncated" if "end of data" in str(exc) else "corrupt_tar", f"not a readable tar: {exc}")
            return
        rng = np.random.default_rng(0)
        while True:
            try:
                info = tar.next()
            except tarfile.TarError as exc:
                kind = "truncated" if "end of data" in str(exc) else "corrupt_tar"
                self.problem(kind, f"after member {self.key!r} at byte {tar.offset}: {exc}", key=self.key)
                return
            if info is None:
                break
            if info.isreg():
                try:
                    data = tar.extractfile(info).read()  # type: ignore[union-attr]
                except tarfile.TarError as exc:
                    key, ext = split_member_name(info.name)
                    self.problem("truncated", f"member {info.name} ({info.size} bytes): {exc}", key=key, member=ext)
                    return
                self._member(info.name, data, rng)
        self._check_end(f, tar.offset)

    def _member(self, name: str, data: bytes, rng: np.random.Generator) -> None:
        key, ext = split_member_name(name)
        if key is None or ext is None:
            self.problem("unkeyed_member", f"member {name!r} has no extension; webdataset drops it")
            return
        if key != self.key:
            if key in self.seen_keys:
                self.problem("duplicate_key", f"key also in {self.seen_keys[key]}", key=key)
            self.seen_keys[key] = self.path
            self.key, self.sample_exts = key, set()
            self.summary.samples += 1
        if ext in self.sample_exts:
            self.problem("duplicate_member", f"member {name!r} repeats .{ext} in one sample", key=key, member=ext)
            return
        self.sample_exts.add(ext)
        self.modalities[ext] += 1
        totals = self.report.extensions.setdefault(ext, ExtensionTotals())
        totals.members += 1
        totals.bytes += len(data)
        check = self.checks.get(ext)
        if check is not None:
            try:
                check(data, rng)
            except Exception as exc:  # any decoder failure is what the report is for
                self.problem("undecodable", f"{type(exc).__name__}: {exc}", key=key, member=ext)

    def _check_end(self, f: Any, offset: int) -> None:
        f.seek(offset)
        tail = f.read(END_OF_ARCHIVE)
        if tail.strip(b"\0"):
            self.problem("corrupt_tar", f"unreadable tar header at byte {offset}, after sample {self.key!r}; the "
                                        f"rest of the shard ({self.summary.bytes - offset} bytes) is never read",
                         key=self.key)
        elif len(tail) < END_OF_ARCHIVE:
            self.problem("truncated", f"ends at byte {self.summary.bytes}, after sample {self.key!r}, without the "
                                      f"end-of-archive marker", key=self.key)


def _indexed(url: str, cache: dict[Path, DatasetIndex | None]) -> Any:
    directory = Path(url).parent
    if directory not in cache:
        cache[directory] = DatasetIndex.load(directory) if (directory / INDEX_NAME).exists() else None
    index = cache[directory]
    return None if index is None else next((s for s in index.shards if s.path == Path(url).name), None)


def _compare_with_index(summary: ShardSummary, entry: Any, report: InspectionReport) -> None:
    summary.index_samples = entry.samples
    diffs = []
    if entry.samples != summary.samples:
        diffs.append(f"samples {entry.samples} in index.json, {summary.samples} read")
    if entry.bytes != summary.bytes:
        diffs.append(f"bytes {entry.bytes} in index.json, {summary.bytes} on disk")
    if entry.modalities != summary.modalities:
        diffs.append(f"per-extension samples {dict(sorted(entry.modalities.items()))} in index.json, "
                     f"{dict(sorted(summary.modalities.items()))} read")
    if diffs:
        report.problems.append(Problem("index_mismatch", summary.path, detail="; ".join(diffs)))


def inspect_shards(spec: str | list[str], *, decoders: Mapping[str, MemberDecoder] | None = None,
                   where: str = "inspect-shards") -> InspectionReport:
    """Read every member of every shard of ``spec`` (module docstring); ``decoders`` maps extensions to decoders."""
    urls = resolve_shards(spec, where=where)
    remote = [u for u in urls if is_remote(u)]
    if remote:
        raise DataError(f"{where}: {remote[0]!r} is not a local shard; inspection reads local files")
    checks = {**BUILTIN_CHECKS, **dict(decoders or {})}
    report = InspectionReport(spec=str(spec), shards=[], extensions={}, problems=[], checked=sorted(checks))
    seen_keys: dict[str, str] = {}
    indexes: dict[Path, DatasetIndex | None] = {}
    for url in urls:
        summary = _ShardReader(url, checks, report, seen_keys).read()
        report.shards.append(summary)
        entry = _indexed(url, indexes)
        if entry is not None:
            _compare_with_index(summary, entry, report)
    return report


def format_inspection(report: InspectionReport, *, max_rows: int = 50) -> str:
    """The report as a text table: per-extension totals, shards (all, or only those with problems when there are
    more than ``max_rows``), then the problems."""
    total_bytes = sum(s.bytes for s in report.shards)
    lines = [f"{len(report.shards)} shards, {report.total_samples} samples, {total_bytes} bytes", "",
             f"{'extension':<12}{'members':>10}{'bytes':>16}  checked"]
    lines += [f"{e:<12}{t.members:>10}{t.bytes:>16}  {'yes' if e in report.checked else 'no (read only)'}"
              for e, t in sorted(report.extensions.items())]
    bad = set(report.bad_shards())
    rows = report.shards if len(report.shards) <= max_rows else [s for s in report.shards if s.path in bad]
    width = max([len(s.path) for s in rows] + [5])
    lines += ["", f"{'shard':<{width}}{'samples':>9}{'index':>9}{'bytes':>14}  status"]
    for s in rows:
        indexed = "-" if s.index_samples is None else str(s.index_samples)
        status = ",".join(sorted({p.kind for p in report.problems if p.shard == s.path})) or "ok"
        lines.append(f"{s.path:<{width}}{s.samples:>9}{indexed:>9}{s.bytes:>14}  {status}")
    if len(rows) < len(report.shards):
        lines.append(f"({len(report.shards) - len(rows)} shards without problems not listed)")
    lines += ["", f"problems: {len(report.problems)}" + ("" if report.problems else " (all shards read cleanly)")]
    for p in report.problems[:max_rows]:
        where = [f"{p.kind:<16}", p.shard, *([f"key {p.key!r}"] if p.key else []),
                 *([f".{p.member}"] if p.member else [])]
        lines.append(f"  {' '.join(where)}: {p.detail}")
    if len(report.problems) > max_rows:
        lines.append(f"  ... {len(report.problems) - max_rows} more (see --json)")
    return "\n".join(lines)

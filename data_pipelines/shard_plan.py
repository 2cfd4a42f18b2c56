"""Planning and writing webdataset shards with exact byte accounting and N parallel writer processes.

The one shard writer of mmssl: the manifest and folder builders call `write_planned`, the bundled sources
`write_shards` (webdataset-style sample dicts). A source (`data_pipelines.manifest`: manifest rows, a folder tree,
an iterator) becomes a stream of
`PlannedSample` (key + members). `ShardPlanner` cuts that stream into shards before anything is written: a shard
closes when it holds ``shard_size`` samples, or when the next sample would push its tar file past ``max_bytes``.
The tar layout is computed exactly (POSIX ustar/pax, IEEE Std 1003.1-2001): a member takes its header (512 bytes,
more for a pax long name) plus its data rounded up to 512 bytes, and the archive ends with two zero blocks (no
tape-record padding), so a shard's file size is ``sum(header + ⌈size/512⌉·512) + 1024``, known from file sizes
alone, and ``max_bytes`` bounds the file size exactly.

Shard ``i`` (``<prefix>-<i:06d>.tar``) is written by whichever of the ``workers`` processes takes it; its bytes
depend on the plan only (members in extension order, mtime 0, uid/gid 0, mode 0444), so the tars and the merged
``index.json`` (`DatasetIndex`) are identical for any number of workers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmssl.data_pipelines.shards import INDEX_NAME, DataError, DatasetIndex, ShardInfo

log = logging.getLogger("mmssl.data")

BLOCK = 512
END_OF_ARCHIVE = 2 * BLOCK
MAX_EXAMPLES = 20
_EXTENSION = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's split of a member name into key and extension


# ------------------------------------------------------------------------------------------------ planned samples
@dataclass(frozen=True)
class Member:
    """One tar member: inline ``data``, or the file at ``path`` that had ``size`` bytes when planned."""

    ext: str
    size: int
    data: bytes | None = None
    path: str | None = None
    origin: str = ""


@dataclass(frozen=True)
class PlannedSample:
    key: str
    members: tuple[Member, ...]  # in extension order
    origin: str  # where it came from (manifest row, file, iterator position), for error messages

    def tar_bytes(self) -> int:
        return sum(len(member_header(f"{self.key}.{m.ext}", m.size)) + padded(m.size) for m in self.members)


@dataclass
class ShardPlan:
    index: int
    samples: list[PlannedSample] = field(default_factory=list)
    bytes: int = END_OF_ARCHIVE


@dataclass
class SkipLog:
    """What a build left out (never silently): counts by reason, the first examples, a warning per item."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{reason}: {where}")
        log.warning("skipped (%s): %s", reason, where)

    def info(self) -> dict[str, Any]:
        return {"skipped": dict(self.counts), "skipped_examples": list(self.examples)} if self.counts else {}


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def member_header(name: str, size: int) -> bytes:
    """The tar header block(s) of member ``name``: fixed mtime, owner and mode, so equal input gives equal bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def split_member_name(name: str) -> tuple[str, str] | tuple[None, None]:
    match = _MEMBER_NAME.match(name)
    return (match.group(1), match.group(2).lower()) if match else (None, None)


def check_key(key: str, where: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("__") or any(p in ("", ".", "..") for p in parts) or "." in parts[-1]:
        raise DataError(f"{where}: sample key {key!r} is not usable: a key is a relative path whose last part holds "
                        f"no '.' (webdataset splits the extension at the first dot of a member's name)")
    return key


def check_extension(ext: str, where: str) -> str:
    if not _EXTENSION.fullmatch(ext.lower()):
        raise DataError(f"{where}: member extension {ext!r} is not usable (letters, digits, '_', '-', inner dots)")
    return ext.lower()


def file_member(path: Path, ext: str, origin: str) -> Member | None:
    """The member holding the bytes of ``path``, or None when it is not a file."""
    try:
        if path.is_file():
            return Member(ext, path.stat().st_size, path=str(path), origin=origin)
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------------ writing
def shard_name(prefix: str, index: int) -> str:
    """``<prefix>-<index:06d>.tar``; with an empty prefix ``<index>.tar`` (CLIP_benchmark's webdataset layout)."""
    return f"{prefix}-{index:06d}.tar" if prefix else f"{index}.tar"


def _member_bytes(member: Member) -> bytes:
    if member.data is not None:
        return member.data
    try:
        data = Path(str(member.path)).read_bytes()
    except OSError as exc:
        raise DataError(f"{member.origin}: cannot read {member.path} while writing shards: {exc}") from None
    if len(data) != member.size:
        raise DataError(f"{member.origin}: {member.path} changed while writing shards ({member.size} bytes when "
                        f"planned, {len(data)} now)")
    return data


def write_shard(plan: ShardPlan, out_dir: str, prefix: str) -> ShardInfo:
    """Write one planned shard (to a temporary name, renamed when complete); runs in a writer process."""
    path = Path(out_dir) / shard_name(prefix, plan.index)
    tmp = path.with_name(path.name + ".tmp")
    modalities: Counter[str] = Counter()
    try:
        with open(tmp, "wb") as f:
            for sample in plan.samples:
                for member in sample.members:
                    data = _member_bytes(member)
                    f.write(member_header(f"{sample.key}.{member.ext}", member.size))
                    f.write(data)
                    f.write(b"\0" * (padded(len(data)) - len(data)))
                modalities.update(m.ext for m in sample.members)
            f.write(b"\0" * END_OF_ARCHIVE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ShardInfo(path=path.name, samples=len(plan.samples), bytes=path.stat().st_size, modalities=dict(modalities))


class ShardPlanner:
    """Cuts a sample stream into shards of at most ``shard_size`` samples and ``max_bytes`` bytes of tar file;
    rejects duplicate keys (naming both origins)."""

    def __init__(self, shard_size: int, max_bytes: float) -> None:
        if shard_size < 1:
            raise DataError(f"shard_size (--shard-size) must be >= 1, got {shard_size}")
        if max_bytes < END_OF_ARCHIVE + 2 * BLOCK:
            raise DataError(f"max_bytes (--max-bytes) must be >= {END_OF_ARCHIVE + 2 * BLOCK}, got {max_bytes:g}")
        self.shard_size, self.max_bytes = shard_size, max_bytes
        self.seen: dict[str, str] = {}

    def plans(self, samples: Iterable[PlannedSample]) -> Iterator[ShardPlan]:
        current = ShardPlan(0)
        for sample in samples:
            if sample.key in self.seen:
                raise DataError(f"{sample.origin}: duplicate sample key {sample.key!r} (first at "
                                f"{self.seen[sample.key]})")
            self.seen[sample.key] = sample.origin
            size = sample.tar_bytes()
            if size + END_OF_ARCHIVE > self.max_bytes:
                raise DataError(f"{sample.origin}: sample {sample.key!r} alone makes a {size + END_OF_ARCHIVE}-byte "
                                f"tar, over max_bytes={self.max_bytes:g} (--max-bytes)")
            if current.samples and current.bytes + size > self.max_bytes:
                yield current
                current = ShardPlan(current.index + 1)
            current.samples.append(sample)
            current.bytes += size
            if len(current.samples) == self.shard_size:
                yield current
                current = ShardPlan(current.index + 1)
        if current.samples:
            yield current


def _remove_outputs(out: Path, prefix: str) -> None:
    shards = [*out.glob(f"{prefix}-*.tar"), *out.glob(f"{prefix}-*.tar.tmp")] if prefix else [
        p for p in [*out.glob("*.tar"), *out.glob("*.tar.tmp")] if p.name.split(".", 1)[0].isdigit()]
    for stale in [*shards, out / INDEX_NAME]:
        stale.unlink(missing_ok=True)


def inline_member(ext: str, value: Any, origin: str) -> Member:
    """A member from a webdataset-style value: bytes as they are, text as UTF-8, numbers as their decimal text,
    anything else as JSON (what webdataset's writer does for ``json`` members)."""
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        data = value.encode("utf-8")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        data = str(value).encode()
    else:
        data = json.dumps(value).encode("utf-8")
    return Member(check_extension(ext, origin), len(data), data=data, origin=origin)


def write_shards(samples: Iterable[Mapping[str, Any]], out_dir: str | Path, *, name: str, max_count: int = 1000,
                 max_bytes: float = 1e9, prefix: str = "shard", info: Mapping[str, Any] | None = None) -> DatasetIndex:
    """`write_planned` for webdataset-style samples ``{"__key__": key, ext: value, ...}`` (the bundled sources'
    form; `inline_member` encodes the values), ``max_count`` samples per shard at most."""

    def planned() -> Iterator[PlannedSample]:
        for i, sample in enumerate(samples):
            key = str(sample.get("__key__", ""))
            if not key or "." in key:
                raise DataError(f"sample key {key!r} is empty or contains '.', which webdataset cannot split")
            origin = f"sample {i} ({key})"
            members = tuple(inline_member(ext, value, origin) for ext, value in sorted(sample.items())
                            if not ext.startswith("__"))
            yield PlannedSample(key, members, origin)

    return write_planned(planned(), out_dir, name=name, shard_size=max_count, max_bytes=max_bytes, prefix=prefix,
                         info=info)


def _with_progress(samples: Iterable[PlannedSample], desc: str) -> Iterator[PlannedSample]:
    """``samples``, counted by a tqdm bar on stderr; tqdm leaves it off when stderr is not a terminal (test logs,
    pipes, batch jobs)."""
    from tqdm import tqdm

    with tqdm(desc=desc, unit="samples", disable=None, leave=False, dynamic_ncols=True) as bar:
        for sample in samples:
            yield sample
            bar.update()


def write_planned(
    samples: Iterable[PlannedSample],
    out_dir: str | Path,
    *,
    name: str,
    shard_size: int = 1000,
    max_bytes: float = 1e9,
    workers: int = 1,
    prefix: str = "shard",
    info: Mapping[str, Any] | None = None,
    skips: SkipLog | None = None,
) -> DatasetIndex:
    """Plan and write shards with ``workers`` processes, then save the merged index. A failure removes everything
    this build wrote (and the stale index), so a directory never holds a half-built data set under an index."""
    if workers < 1:
        raise DataError(f"workers (--workers) must be >= 1, got {workers}")
    planner = ShardPlanner(shard_size, max_bytes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_outputs(out, prefix)
    shards: list[ShardInfo] = []
    samples = _with_progress(samples, f"writing {name}")
    try:
        if workers == 1:
            shards = [write_shard(plan, str(out), prefix) for plan in planner.plans(samples)]
        else:
            with ProcessPoolExecutor(workers) as pool:
                pending: deque[Future[ShardInfo]] = deque()
                try:
                    for plan in planner.plans(samples):
                        pending.append(pool.submit(write_shard, plan, str(out), prefix))
                        if len(pending) >= 2 * workers:  # bounded: plans hold inline member bytes
                            shards.append(pending.popleft().result())
                    shards.extend(f.result() for f in list(pending))
                except BaseException:
                    for f in pending:
                        f.cancel()
                    raise
    except BaseException:
        _remove_outputs(out, prefix)
        raise
    skipped = skips.info() if skips else {}
    if not shards:
        raise DataError(f"no samples to write to {out}" + (f" (skipped: {skipped['skipped']})" if skipped else ""))
    index = DatasetIndex(name=name, shards=shards, info={**dict(info or {}), **skipped})
    index.save(out)
    return index


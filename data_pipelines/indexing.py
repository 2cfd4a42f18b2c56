"""``mmssl index-shards DIR``: the ``index.json`` of a directory of webdataset tars that has none (img2dataset's output,
or tars from any other writer), so that exact epochs, resume and the pre-launch checks know the samples per shard.

Every ``*.tar`` of the directory is indexed, in name order (the order `resolve_shards` reads such a directory in):

* **From img2dataset's stats.** img2dataset writes ``<shard>_stats.json`` beside each tar once the shard is complete
  (``00000.tar`` -> ``00000_stats.json``: ``{"count": rows tried, "successes": samples written, "failed_to_download",
  "failed_to_resize", "duration", "status_dict", ...}``, its ``write_stats``). The shard's samples are its
  ``successes``, **checked** against the tar: the tar's headers are walked, seeking over member data (one 512-byte
  read per member, not the images), and its members grouped into samples as webdataset groups them (consecutive
  members sharing the name up to the first ``.``). A shard whose tar disagrees with its stats — another number of
  samples, a member running past the end of the file, no end-of-archive marker — is an **error naming the shard**
  and both numbers: stats and tar no longer describe the same data (a copy cut short, a tar rewritten after the
  download), and which is right cannot be told here. ``recount`` (``--recount``) ignores the stats and counts.
* **By counting.** A tar without stats (a shard img2dataset never finished, another writer's tars), or every tar
  with ``recount``, is read once through the stream's own reader (`ShardReader`, no retries): the count is exactly
  what training reads — a truncated or corrupt tar counts the samples before the fault, and the fault is listed in
  the index's ``info["faults"]`` (and printed by the command).

Per shard the index holds samples, bytes (the file size) and per-extension sample counts, as `mmssl make-shards`
writes them, so ``mmssl inspect-shards DIR`` checks the result like any other index.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmssl.data_pipelines.reader import FaultLog, ShardReader
from mmssl.data_pipelines.shard_plan import END_OF_ARCHIVE, split_member_name
from mmssl.data_pipelines.shards import INDEX_NAME, DataError, DatasetIndex, ShardInfo, directory_tars

STATS_SUFFIX = "_stats.json"
_WDS_META = re.compile(r"__[^/]*__($|/)")  # member names webdataset's tar iterator skips (webdataset.tariterators)


@dataclass
class ShardCount:
    """One tar's entry and how it was found: ``source`` is ``stats`` (img2dataset's, checked) or ``tar`` (read)."""

    info: ShardInfo
    source: str
    stats: dict[str, Any] = field(default_factory=dict)
    faults: list[dict[str, str]] = field(default_factory=list)


def read_stats(path: Path) -> dict[str, Any] | None:
    """img2dataset's per-shard stats beside ``path`` (``00000.tar`` -> ``00000_stats.json``), or None."""
    stats_path = path.with_name(path.stem + STATS_SUFFIX)
    if not stats_path.is_file():
        return None
    try:
        stats = json.loads(stats_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{stats_path}: unreadable img2dataset stats: {exc}") from None
    successes = stats.get("successes") if isinstance(stats, dict) else None
    if not isinstance(successes, int) or isinstance(successes, bool) or successes < 0:
        raise DataError(f"{stats_path}: not img2dataset's per-shard stats (no integer 'successes' >= 0); remove it "
                        f"or pass --recount to count the tar's samples")
    return stats


def scan_headers(path: Path) -> tuple[int, dict[str, int], str | None]:
    """``(samples, extension -> samples carrying it, problem or None)`` from the tar's headers alone, grouping
    members into samples as webdataset does; a problem stops the walk (the samples before it are counted)."""
    size = path.stat().st_size
    samples, key = 0, None
    exts: set[str] = set()
    modalities: Counter[str] = Counter()
    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 - wraps `f`
        except tarfile.TarError as exc:
            return 0, {}, f"not a readable tar: {exc}"
        while True:
            try:
                info = tar.next()
            except tarfile.TarError as exc:
                return samples, dict(modalities), f"unreadable tar header at byte {tar.offset}: {exc}"
            if info is None:
                break
            tar.members = []  # headers are not kept: a shard may hold many thousand members
            if not info.isreg() or _WDS_META.match(info.name):
                continue
            if info.offset_data + info.size > size:
                return samples, dict(modalities), (f"member {info.name} ends at byte {info.offset_data + info.size}, "
                                                   f"past the end of the file ({size} bytes)")
            name, ext = split_member_name(info.name)
            if name is None or ext is None:
                continue  # no extension: webdataset drops the member
            if name != key:
                key, exts, samples = name, set(), samples + 1
            if ext in exts:
                return samples, dict(modalities), f"member {info.name} repeats .{ext} in one sample"
            exts.add(ext)
            modalities[ext] += 1
        f.seek(tar.offset)
        tail = f.read(END_OF_ARCHIVE)
    if tail.strip(b"\0"):
        return samples, dict(modalities), f"unreadable tar header at byte {tar.offset}"
    if len(tail) < END_OF_ARCHIVE:
        return samples, dict(modalities), f"no end-of-archive marker: the file ends at byte {size}"
    return samples, dict(modalities), None


def count_samples(path: Path) -> tuple[int, dict[str, int], list[dict[str, str]]]:
    """``(samples, extension -> samples carrying it, faults)``: the tar read once as the training stream reads it."""
    faults = FaultLog()
    reader = ShardReader(where="index-shards", retries=0, faults=faults)
    samples = 0
    modalities: Counter[str] = Counter()
    for _, sample in reader.samples(str(path)):
        samples += 1
        modalities.update(k for k in sample if not k.startswith("__"))
    return samples, dict(modalities), faults.take()[1]


def index_one(path: Path, recount: bool = False) -> ShardCount:
    """One tar's entry: from its img2dataset stats, checked against its headers, or counted (module docstring)."""
    stats = None if recount else read_stats(path)
    size = path.stat().st_size
    if stats is None:
        samples, modalities, faults = count_samples(path)
        return ShardCount(ShardInfo(path.name, samples, size, modalities), "tar", faults=faults)
    samples, modalities, problem = scan_headers(path)
    expected = stats["successes"]
    if problem is not None or samples != expected:
        found = f"{samples} sample(s) in the tar" + (f" before a fault: {problem}" if problem else "")
        raise DataError(f"{path}: {path.stem}{STATS_SUFFIX} says {expected} successes, found {found}; the tar and "
                        f"its stats disagree (a copy cut short? a tar rewritten after the download?): check it with "
                        f"`mmssl inspect-shards`, or pass --recount to count every tar by reading it")
    return ShardCount(ShardInfo(path.name, samples, size, modalities), "stats", stats=stats)


def _counts(tars: list[Path], recount: bool, workers: int) -> Iterator[ShardCount]:
    if workers <= 1:
        yield from (index_one(t, recount) for t in tars)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(index_one, tars, [recount] * len(tars))


def index_directory(directory: str | Path, *, recount: bool = False, overwrite: bool = False, workers: int = 1,
                    name: str | None = None, progress: bool = False) -> DatasetIndex:
    """Write ``directory/index.json`` for its ``*.tar`` files (module docstring) and return it. An existing index is
    kept unless ``overwrite``; ``workers`` processes index tars in parallel."""
    top = Path(directory)
    if not top.is_dir():
        raise DataError(f"index-shards: {top} is not a directory")
    if (top / INDEX_NAME).exists() and not overwrite:
        raise DataError(f"index-shards: {top / INDEX_NAME} already exists; pass --overwrite to replace it")
    if workers < 1:
        raise DataError(f"index-shards: --workers must be >= 1, got {workers}")
    tars = directory_tars(top)
    if not tars:
        raise DataError(f"index-shards: {top} holds no .tar files")
    from tqdm import tqdm

    counts = list(tqdm(_counts(tars, recount, workers), total=len(tars), desc="index-shards", unit="shard",
                       disable=not progress, mininterval=1.0))
    totals: Counter[str] = Counter()
    for c in counts:
        totals.update({k: v for k, v in c.stats.items() if k in ("count", "successes", "failed_to_download",
                                                                  "failed_to_resize") and isinstance(v, int)})
    info: dict[str, Any] = {"source": "index-shards", "directory": str(top.resolve()),
                            "counted_from": dict(Counter(c.source for c in counts))}
    if totals:
        info["img2dataset_stats"] = dict(totals)
    faults = [f for c in counts for f in c.faults]
    if faults:
        info["faults"] = faults
    index = DatasetIndex(name=name or top.resolve().name, shards=[c.info for c in counts], info=info)
    index.save(top)
    return index

"""The per-dataset index file and resolving a shard specification to URLs (shards are written by
`data_pipelines.shard_plan`, the one writer).

Layout of a dataset directory written here::

    <dir>/shard-000000.tar ... shard-NNNNNN.tar   # webdataset tars (one sample = members sharing a key)
    <dir>/index.json                              # DatasetIndex: shards, samples and bytes per shard, modalities

The index is what exact epoch accounting, resume and pre-launch checks read; a shard specification given to the
loader may be that directory, the ``index.json`` path, a brace pattern (``data/x/shard-{000000..000009}.tar``), a
``pipe:`` command or an ``http(s)://`` URL.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import braceexpand

INDEX_NAME = "index.json"


class DataError(ValueError):
    """Bad data input: a missing shard, an unreadable index, a sample that cannot be written."""


@dataclass
class ShardInfo:
    path: str  # relative to the index directory
    samples: int
    bytes: int
    modalities: dict[str, int] = field(default_factory=dict)  # member extension -> number of samples carrying it


@dataclass
class DatasetIndex:
    name: str
    shards: list[ShardInfo]
    info: dict[str, Any] = field(default_factory=dict)  # free-form provenance: source, license, split, labels

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def modalities(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for s in self.shards:
            total.update(s.modalities)
        return dict(total)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / INDEX_NAME
        atomic_write_text(path, json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> DatasetIndex:
        path = Path(path)
        if path.is_dir():
            path = path / INDEX_NAME
        try:
            raw = json.loads(path.read_text())
            return cls(name=raw["name"], shards=[ShardInfo(**s) for s in raw["shards"]], info=raw.get("info", {}))
        except FileNotFoundError:
            raise DataError(f"dataset index not found: {path}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"dataset index {path} is malformed: {exc}") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_remote(url: str) -> bool:
    return url.startswith(("pipe:", "http://", "https://", "gs://", "s3://"))


def resolve_shards(spec: str | list[str], *, where: str = "shards") -> list[str]:
    """Turn a shard specification into a list of shard URLs, checking that local files exist.

    ``where`` names the origin of ``spec`` (a recipe key or a CLI flag) so errors can point at it.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        path = Path(item)
        if not is_remote(item) and (path.is_dir() or path.name == INDEX_NAME):
            index_path = path / INDEX_NAME if path.is_dir() else path
            if not index_path.exists():
                raise DataError(f"{where}: {item!r} has no {INDEX_NAME}; write it with `mmssl make-shards`")
            index = DatasetIndex.load(index_path)
            urls.extend(str(index_path.parent / s.path) for s in index.shards)
            continue
        urls.extend(braceexpand.braceexpand(item))
    if not urls:
        raise DataError(f"{where}: {spec!r} names no shards")
    missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{where}: shard not found: {missing[0]}{more}")
    return urls


def shard_sizes(urls: list[str]) -> dict[str, int] | None:
    """Samples per shard from the index files next to local shards, or None when any shard has no index."""
    sizes: dict[str, int] = {}
    indexes: dict[Path, DatasetIndex] = {}
    for url in urls:
        if is_remote(url):
            return None
        directory = Path(url).parent
        if directory not in indexes:
            if not (directory / INDEX_NAME).exists():
                return None
            indexes[directory] = DatasetIndex.load(directory)
        by_name = {s.path: s.samples for s in indexes[directory].shards}
        if Path(url).name not in by_name:
            return None
        sizes[url] = by_name[Path(url).name]
    return sizes

"""The per-dataset index file and resolving a shard specification to URLs (shards are written by
`data_pipelines.shard_plan`, the one writer).

Layout of a dataset directory written here::

    <dir>/shard-000000.tar ... shard-NNNNNN.tar   # webdataset tars (one sample = members sharing a key)
    <dir>/index.json                              # DatasetIndex: shards, samples and bytes per shard, modalities

The index is what exact epoch accounting, resume and pre-launch checks read; a shard specification given to the
loader may be that directory, the ``index.json`` path, a directory of ``.tar`` files without an index (img2dataset's
output: ``00000.tar``, ``00000.parquet``, ``00000_stats.json``, ...; its tars in name order, every other file left
alone; `data_pipelines.indexing` writes its index), a brace pattern (``data/x/shard-{000000..000009}.tar``), a
``pipe:`` command or a URL.

**URLs.** Shards are opened by webdataset's ``gopen`` (`data_pipelines.reader`): a local path, ``file:``,
``pipe:CMD`` (the tar is the command's standard output) and the schemes of its dispatch table
``webdataset.gopen.gopen_schemes`` (webdataset 1.0: ``http``, ``https``, ``sftp``, ``ftps``, ``scp`` through ``curl``,
``gs`` through ``gsutil``, ``hf`` through ``huggingface_hub`` + ``curl``, ``ais``). Any other scheme (``s3://``,
``az://``, ...) has no handler: at run time each such shard would fail, be retried ``data.retries`` times and be
counted as unreachable, so `resolve_shards` refuses it before a run starts, naming the ``pipe:`` form that streams
it (``pipe:aws s3 cp s3://bucket/x.tar -``). A scheme webdataset opens through a command missing from ``PATH``
(``gsutil`` for ``gs://``, ``curl`` for the http family) is refused the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

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


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
# the command each of webdataset's scheme handlers runs (webdataset.gopen: gopen_curl, gopen_gsutil, gopen_hf, ...)
HANDLER_COMMANDS = {"http": "curl", "https": "curl", "sftp": "curl", "ftps": "curl", "scp": "curl", "htgs": "curl",
                    "hf": "curl", "gs": "gsutil", "ais": "ais"}
# the pipe: command that streams an object of a scheme webdataset cannot open (the tar on the command's stdout)
PIPE_FORMS = {"s3": "pipe:aws s3 cp {url} -", "gs": "pipe:gcloud storage cat {url}", "http": "pipe:wget -q -O - {url}",
              "https": "pipe:wget -q -O - {url}",
              "hf": "pipe:wget -q -O - https://huggingface.co/datasets/ORG/NAME/resolve/main/FILE"}


def url_scheme(url: str) -> str:
    """The scheme of a shard URL: '' for a local path, ``pipe`` for ``pipe:CMD``, ``s3`` for ``s3://...``."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else ""


def is_remote(url: str) -> bool:
    """Whether ``url`` is opened through a command or the network (retried when it fails), not as a local file."""
    return url_scheme(url) not in ("", "file")


def local_path(url: str) -> str:
    """``file:/x`` or ``file:///x`` as the path ``/x``; anything else as it is."""
    return unquote(urlparse(url).path) if url_scheme(url) == "file" else url


def supported_schemes() -> list[str]:
    """The URL schemes the installed webdataset opens, with ``file`` and ``pipe``."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the module (the package exports a function of that name)
    return sorted({"file", "pipe", *(s for s in gopen.gopen_schemes if not s.startswith("__"))})


def check_url(url: str, where: str) -> None:
    """Refuse a shard URL webdataset cannot open, naming the ``pipe:`` form that streams it (module docstring)."""
    scheme = url_scheme(url)
    if scheme in ("", "file", "pipe"):
        return
    hint = PIPE_FORMS.get(scheme, "pipe:COMMAND, any command that writes the tar to its standard output").format(
        url=url)
    supported = supported_schemes()
    if scheme not in supported:
        raise DataError(f"{where}: {url!r} uses the {scheme}:// scheme, which webdataset cannot open (it opens local "
                        f"paths and {', '.join(s + ':' for s in supported)}); stream it through a command instead: "
                        f"'{hint}'")
    command = HANDLER_COMMANDS.get(scheme)
    if command is not None and shutil.which(command) is None:
        raise DataError(f"{where}: {url!r}: webdataset opens {scheme}:// with `{command}`, which is not on PATH; "
                        f"install it, or stream the shard through a command of your own: '{hint}'")


def directory_tars(directory: Path) -> list[Path]:
    """The ``.tar`` files of a dataset directory without an index, in name order (img2dataset numbers them
    ``00000.tar``, ``00001.tar``, ...); other files (``.parquet``, ``_stats.json``) are not shards."""
    return sorted((p for p in directory.iterdir() if p.suffix == ".tar" and p.is_file()), key=lambda p: p.name)


def resolve_shards(spec: str | list[str], *, where: str = "shards") -> list[str]:
    """Turn a shard specification into a list of shard URLs, checking that local files exist and that webdataset
    can open every URL scheme (`check_url`); a directory without ``index.json`` gives its ``.tar`` files.

    ``where`` names the origin of ``spec`` (a recipe key or a CLI flag) so errors can point at it.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        path = Path(local_path(item))
        if not is_remote(item) and (path.is_dir() or path.name == INDEX_NAME):
            index_path = path / INDEX_NAME if path.is_dir() else path
            if path.is_dir() and not index_path.exists():
                tars = directory_tars(path)
                if not tars:
                    raise DataError(f"{where}: {item!r} has no {INDEX_NAME} and no .tar files; write shards there "
                                    f"with `mmssl make-shards`")
                urls.extend(str(t) for t in tars)
                continue
            index = DatasetIndex.load(index_path)
            urls.extend(str(index_path.parent / s.path) for s in index.shards)
            continue
        expanded = list(braceexpand.braceexpand(item))
        one_per_scheme = {url_scheme(u): u for u in expanded}
        for url in [item] if len(one_per_scheme) == 1 else one_per_scheme.values():  # the pattern names them all
            check_url(url, where)
        urls.extend(local_path(u) for u in expanded)
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

"""Building webdataset shards from a manifest (CSV / TSV / JSONL / Parquet), a folder tree or an iterator of samples,
written by N parallel processes into byte-identical shards and one merged `DatasetIndex` (`data_pipelines.shard_plan`:
exact tar sizes, ``shard_size`` / ``max_bytes`` bounds, deterministic output for any number of workers).

Manifest columns map to shard members by a spec, e.g. ``columns={"image": "file", "caption": "text"}``:

* ``file`` / ``file:EXT``: the cell is a file path (relative paths are taken from ``base_dir``, by default the
  manifest's folder); the member holds the file's bytes, with the path's extension (everything after the first
  ``.`` of the file name, lower-cased: webdataset's rule) or ``EXT``;
* ``text`` / ``text:EXT``: the cell is inline text, written as ``.txt`` (or ``.EXT``);
* ``json``, the default for every column not named: the value goes into the sample's ``.json`` metadata;
* ``drop``: ignored.

An empty cell means the sample has no such member (a missing modality); a row with no member at all is skipped and
counted. The key is the ``key`` column's value, or the 1-based row number (``000000001``). Bad input raises
`DataError` naming the manifest, the row and the value: a file a row names that does not exist (unless
``skip_missing``: the row is skipped, logged and counted in the index's ``info["skipped"]``), a column the manifest
lacks, a duplicate key. Parquet needs pyarrow (an error names it when it is not installed).
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmssl.data_pipelines.shard_plan import (
    Member,
    PlannedSample,
    SkipLog,
    check_extension,
    check_key,
    file_member,
    split_member_name,
    write_planned,
)
from mmssl.data_pipelines.shards import DataError, DatasetIndex

META_EXTENSION = "json"
TEXT_EXTENSION = "txt"
SPEC_KINDS = ("file", "text", "json", "drop")


# ------------------------------------------------------------------------------------------------ manifests
@dataclass(frozen=True)
class ColumnSpec:
    kind: str  # file | text | json | drop
    ext: str | None = None

    @classmethod
    def parse(cls, column: str, spec: str) -> ColumnSpec:
        kind, _, ext = spec.partition(":")
        where = f"columns: {column}={spec}"
        if kind not in SPEC_KINDS or (ext and kind in ("json", "drop")) or (not ext and spec.endswith(":")):
            raise DataError(f"{where}: unknown column spec {spec!r}; use file, file:EXT, text, text:EXT, json or drop")
        if ext:
            return cls(kind, check_extension(ext, where))
        return cls(kind, TEXT_EXTENSION if kind == "text" else None)


class Manifest:
    """Rows of a CSV / TSV / JSONL / Parquet manifest as ``(where, row number, {column: value})``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.format = self.path.suffix.lower().lstrip(".")
        if self.format not in ("csv", "tsv", "jsonl", "ndjson", "parquet"):
            raise DataError(f"--manifest {self.path}: unknown manifest format {self.path.suffix!r}; use .csv, .tsv, "
                            f".jsonl or .parquet")
        if not self.path.is_file():
            raise DataError(f"--manifest {self.path}: no such file")
        self.columns: list[str] | None = None  # known up front for CSV and Parquet
        if self.format in ("csv", "tsv"):
            self.columns = next(self._csv(header_only=True))[2]["header"]
        elif self.format == "parquet":
            self.columns = list(self._parquet_file().schema_arrow.names)

    def rows(self) -> Iterator[tuple[str, int, dict[str, Any]]]:
        if self.format in ("csv", "tsv"):
            yield from self._csv()
        elif self.format == "parquet":
            number = 0
            for batch in self._parquet_file().iter_batches():
                for row in batch.to_pylist():
                    number += 1
                    yield f"manifest {self.path} row {number}", number, row
        else:
            yield from self._jsonl()

    def _csv(self, header_only: bool = False) -> Iterator[tuple[str, int, dict[str, Any]]]:
        with open(self.path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter="\t" if self.format == "tsv" else ",")
            try:
                header = next(reader, None)
                if not header:
                    raise DataError(f"manifest {self.path}: empty, no header row")
                dup = [c for c, n in Counter(header).items() if n > 1]
                if dup:
                    raise DataError(f"manifest {self.path}: column {dup[0]!r} appears twice in the header")
                if header_only:
                    yield "", 0, {"header": header}
                    return
                number = 0
                for values in reader:
                    if not values:
                        continue
                    number += 1
                    where = f"manifest {self.path} row {number} (line {reader.line_num})"
                    if len(values) != len(header):
                        raise DataError(f"{where}: {len(values)} values for the {len(header)} header columns")
                    yield where, number, dict(zip(header, values, strict=True))
            except (csv.Error, UnicodeDecodeError) as exc:
                raise DataError(f"manifest {self.path} line {reader.line_num}: unreadable: {exc}") from None

    def _jsonl(self) -> Iterator[tuple[str, int, dict[str, Any]]]:
        with open(self.path, encoding="utf-8") as f:
            number = 0
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                number += 1
                where = f"manifest {self.path} row {number} (line {line_no})"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not JSON: {exc}") from None
                if not isinstance(row, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
                yield where, number, row

    def _parquet_file(self) -> Any:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"--manifest {self.path}: reading a .parquet manifest needs the pyarrow package, which is "
                            f"not installed (pip install pyarrow), or write the manifest as .csv / .jsonl") from None
        return pq.ParquetFile(self.path)


def _row_sample(where: str, number: int, row: dict[str, Any], specs: Mapping[str, ColumnSpec], key_column: str | None,
                base: Path, skip_missing: bool, skips: SkipLog) -> PlannedSample | None:
    if key_column is not None:
        value = row.get(key_column)
        if value is None or value == "":
            raise DataError(f"{where}: key column {key_column!r} is empty")
        key = check_key(str(value), where)
    else:
        key = f"{number:09d}"
    members: dict[str, Member] = {}
    meta: dict[str, Any] = {}
    for column, value in row.items():
        spec = specs.get(column, ColumnSpec("json"))
        if column == key_column or spec.kind == "drop":
            continue
        if spec.kind == "json":
            meta[column] = value
            continue
        if value is None or value == "":
            continue
        origin = f"{where}, column {column!r}"
        if spec.kind == "text":
            if isinstance(value, dict | list | bool):
                raise DataError(f"{origin}: expected text, got {value!r}")
            data = str(value).encode("utf-8")
            member: Member | None = Member(str(spec.ext), len(data), data=data, origin=origin)
        else:
            if not isinstance(value, str):
                raise DataError(f"{origin}: expected a file path, got {value!r}")
            path = Path(value) if os.path.isabs(value) else base / value
            ext = spec.ext or split_member_name(Path(value).name)[1]
            if not ext:
                raise DataError(f"{origin}: cannot tell the member extension of {value!r}; give it as "
                                f"{column}=file:EXT")
            member = file_member(path, check_extension(ext, origin), origin)
            if member is None:
                if skip_missing:
                    skips.add("missing_file", f"{origin}: {value!r} ({path})")
                    return None
                raise DataError(f"{origin}: file {value!r} not found (looked for {path}); fix the row or pass "
                                f"--skip-missing to skip such rows")
        if member.ext in members:
            raise DataError(f"{origin}: member .{member.ext} of sample {key!r} is filled by two columns")
        members[member.ext] = member
    if meta:
        if META_EXTENSION in members:
            raise DataError(f"{where}: a column writes .json, which the metadata columns {sorted(meta)} also need")
        data = json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8")
        members[META_EXTENSION] = Member(META_EXTENSION, len(data), data=data, origin=where)
    if not members.keys() - {META_EXTENSION}:
        skips.add("no_member", f"{where}: every file / text cell is empty")
        return None
    return PlannedSample(key, tuple(members[e] for e in sorted(members)), where)


def build_from_manifest(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    columns: Mapping[str, str],
    key: str | None = None,
    base_dir: str | Path | None = None,
    skip_missing: bool = False,
    shard_size: int = 1000,
    max_bytes: float = 1e9,
    workers: int = 1,
    name: str | None = None,
    prefix: str = "shard",
) -> DatasetIndex:
    """Shards from a manifest, one sample per row; ``columns`` maps column -> spec (module docstring)."""
    source = Manifest(manifest)
    specs = {c: ColumnSpec.parse(c, s) for c, s in columns.items()}
    explicit = Counter(s.ext for s in specs.values() if s.kind in ("file", "text"))
    clash = [e for e, n in explicit.items() if e is not None and n > 1]
    if clash:
        raise DataError(f"columns: more than one column writes member .{clash[0]}")
    if not any(s.kind in ("file", "text") for s in specs.values()):
        raise DataError(f"columns: no column of {source.path} maps to a member; give COLUMN=file|file:EXT|text|"
                        f"text:EXT")
    wanted = [*specs, *([key] if key is not None else [])]
    if source.columns is not None:
        unknown = [c for c in wanted if c not in source.columns]
        if unknown:
            raise DataError(f"manifest {source.path}: no column {unknown[0]!r} (columns: {source.columns})")
    base = Path(base_dir) if base_dir is not None else source.path.parent
    skips = SkipLog()
    seen_columns: set[str] = set()

    def samples() -> Iterator[PlannedSample]:
        for where, number, row in source.rows():
            seen_columns.update(row)
            sample = _row_sample(where, number, row, specs, key, base, skip_missing, skips)
            if sample is not None:
                yield sample
        never = [c for c in wanted if c not in seen_columns]
        if never:
            raise DataError(f"manifest {source.path}: column {never[0]!r} appears in no row")

    info = {"source": "manifest", "manifest": str(manifest), "columns": dict(columns), "key": key,
            "shard_size": shard_size, "max_bytes": max_bytes}
    return write_planned(samples(), out_dir, name=name or source.path.stem, shard_size=shard_size,
                         max_bytes=max_bytes, workers=workers, prefix=prefix, info=info, skips=skips)


# ------------------------------------------------------------------------------------------------ folders, iterators
def build_from_folder(
    root: str | Path,
    out_dir: str | Path,
    *,
    label_field: str | None = None,
    extensions: Collection[str] | None = None,
    shard_size: int = 1000,
    max_bytes: float = 1e9,
    workers: int = 1,
    name: str | None = None,
    prefix: str = "shard",
) -> DatasetIndex:
    """Shards from a folder tree: files sharing a path up to the first ``.`` of their name form one sample
    (``a/b/x.jpg`` + ``a/b/x.txt`` -> key ``a/b/x``), samples in key order; hidden files and folders are left out.
    ``label_field`` stores each sample's parent folder name in its ``.json`` (merged into an ``x.json`` file when
    there is one); ``extensions`` keeps only those members. Files without an extension, or with one not kept, are
    skipped and counted."""
    top = Path(root)
    if not top.is_dir():
        raise DataError(f"--root {top}: not a directory")
    keep = {check_extension(e, "--ext") for e in extensions} if extensions else None
    skips = SkipLog()
    groups: dict[str, dict[str, Path]] = {}
    for directory, subdirs, files in os.walk(top):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for filename in sorted(f for f in files if not f.startswith(".")):
            path = Path(directory) / filename
            relative = path.relative_to(top).as_posix()
            key, ext = split_member_name(relative)
            if key is None or ext is None:
                skips.add("no_extension", str(path))
            elif keep is not None and ext not in keep:
                skips.add("other_extension", str(path))
            elif ext in groups.setdefault(key, {}):
                raise DataError(f"--root {top}: {path} and {groups[key][ext]} are both member .{ext} of sample {key!r}")
            else:
                groups[key][ext] = path

    def samples() -> Iterator[PlannedSample]:
        for key in sorted(groups):
            files = groups[key]
            origin = f"--root {top}: sample {key!r}"
            check_key(key, origin)
            members = {e: file_member(p, check_extension(e, str(p)), str(p)) for e, p in files.items()}
            if label_field is not None:
                parts = key.split("/")
                if len(parts) < 2:
                    raise DataError(f"{origin}: at the top of the folder, it has no parent folder to take "
                                    f"{label_field!r} (--label) from")
                members[META_EXTENSION] = _labelled_meta(files.get(META_EXTENSION), label_field, parts[-2], origin)
            if any(m is None for m in members.values()):
                raise DataError(f"{origin}: a file vanished while listing the folder")
            yield PlannedSample(key, tuple(m for _, m in sorted(members.items()) if m is not None), origin)

    info = {"source": "folder", "root": str(root), "label_field": label_field, "shard_size": shard_size,
            "max_bytes": max_bytes}
    return write_planned(samples(), out_dir, name=name or top.resolve().name, shard_size=shard_size,
                         max_bytes=max_bytes, workers=workers, prefix=prefix, info=info, skips=skips)


def _labelled_meta(json_file: Path | None, field_name: str, label: str, origin: str) -> Member:
    meta: Any = {}
    if json_file is not None:
        try:
            meta = json.loads(json_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise DataError(f"{json_file}: cannot add the label to this metadata file: {exc}") from None
        if not isinstance(meta, dict) or meta.get(field_name, label) != label:
            raise DataError(f"{json_file}: metadata is not an object, or its {field_name!r} differs from the "
                            f"folder name {label!r}")
    data = json.dumps({**meta, field_name: label}, ensure_ascii=False).encode("utf-8")
    return Member(META_EXTENSION, len(data), data=data, origin=origin)


def build_from_iterator(
    samples: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    name: str = "samples",
    shard_size: int = 1000,
    max_bytes: float = 1e9,
    workers: int = 1,
    prefix: str = "shard",
    info: Mapping[str, Any] | None = None,
) -> DatasetIndex:
    """Shards from samples ``{"__key__": str, ext: bytes | str | os.PathLike | dict (for .json)}``; a path value is
    read by the writer process (so large files never pass through this one)."""

    def planned() -> Iterator[PlannedSample]:
        for position, sample in enumerate(samples):
            where = f"sample {position}"
            key = check_key(str(sample.get("__key__", "")), where)
            members: list[Member] = []
            for raw_ext, value in sample.items():
                if raw_ext.startswith("__"):
                    continue
                ext = check_extension(raw_ext, f"{where} ({key!r})")
                origin = f"{where} ({key!r}), member .{ext}"
                if isinstance(value, os.PathLike):
                    member = file_member(Path(value), ext, origin)
                    if member is None:
                        raise DataError(f"{origin}: file {os.fspath(value)!r} not found")
                    members.append(member)
                    continue
                if isinstance(value, bytes | bytearray | memoryview):
                    data = bytes(value)
                elif isinstance(value, str):
                    data = value.encode("utf-8")
                elif ext == META_EXTENSION and isinstance(value, dict | list):
                    data = json.dumps(value, ensure_ascii=False).encode("utf-8")
                else:
                    raise DataError(f"{origin}: a {type(value).__name__} is not bytes, str, a path or (for .json) "
                                    f"a dict")
                members.append(Member(ext, len(data), data=data, origin=origin))
            if len({m.ext for m in members}) != len(members):
                raise DataError(f"{where} ({key!r}): two members share an extension after lower-casing")
            if not members:
                raise DataError(f"{where} ({key!r}): the sample has no member")
            yield PlannedSample(key, tuple(sorted(members, key=lambda m: m.ext)), where)

    return write_planned(planned(), out_dir, name=name, shard_size=shard_size, max_bytes=max_bytes, workers=workers,
                         prefix=prefix, info={"source": "iterator", **dict(info or {})})

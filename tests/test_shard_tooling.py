"""Shard tooling: `make-shards manifest / folder` (data_pipelines.manifest, data_pipelines.shard_plan) and
`inspect-shards` (data_pipelines.inspect), on real tar shards read back through the training reader."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mmssl.data_pipelines.inspect import inspect_shards
from mmssl.data_pipelines.manifest import build_from_folder, build_from_iterator, build_from_manifest
from mmssl.data_pipelines.shards import DataError, DatasetIndex, resolve_shards
from mmssl.data_pipelines.stream import read_once
from mmssl.tools.cli import main as cli_main

FIELDS = {"blob": ["bin"], "caption": ["txt", "caption"]}


def _raw(data: bytes, rng: np.random.Generator) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


DECODERS = {"blob": _raw, "caption": _raw}


def _read_back(out: Path) -> dict[str, dict]:
    """key -> {"blob": bytes | None, "caption": str | None, "meta": dict}, read with the evaluation reader."""
    samples = {}
    for batch in read_once(resolve_shards(str(out)), fields=FIELDS, decoders=DECODERS, batch_size=1):
        assert not batch.stats, batch.stats
        got = {m: bytes(batch.inputs[m][0].numpy()) if m in batch.inputs and batch.present[m][0] else None
               for m in FIELDS}
        got["caption"] = got["caption"].decode() if got["caption"] is not None else None
        got["meta"] = {k: v[0] for k, v in batch.meta.items() if v[0] is not None}
        samples[batch.keys[0]] = got
    return samples


@pytest.fixture
def media(tmp_path: Path) -> list[dict]:
    """12 rows: a random-size binary file each, a caption (one empty), a label; sizes 0..~3 KiB."""
    rng = np.random.default_rng(0)
    (tmp_path / "media").mkdir()
    rows = []
    for i in range(12):
        data = rng.integers(0, 256, size=int(rng.integers(0, 3000))).astype(np.uint8).tobytes()
        (tmp_path / "media" / f"f{i}.bin").write_bytes(data)
        rows.append({"id": f"s{i:02d}", "path": f"media/f{i}.bin", "caption": "" if i == 4 else f"caption {i} é",
                     "label": i % 3, "data": data})
    return rows


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "path", "caption", "label"])
        writer.writerows([r["id"], r["path"], r["caption"], r["label"]] for r in rows)
    return path


def _tar_samples(path: Path) -> dict[str, dict[str, int]]:
    """key -> {ext: size} counted straight from a tar file."""
    out: dict[str, dict[str, int]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = m.size
    return out


# ------------------------------------------------------------------------------------------------ building
def test_csv_manifest_round_trip(media: list[dict], tmp_path: Path) -> None:
    manifest = _write_csv(tmp_path / "m.csv", media)
    index = build_from_manifest(manifest, tmp_path / "out", columns={"path": "file", "caption": "text"}, key="id",
                                shard_size=5)
    got = _read_back(tmp_path / "out")
    assert sorted(got) == [r["id"] for r in media]
    for r in media:
        assert got[r["id"]]["blob"] == r["data"]
        assert got[r["id"]]["caption"] == (r["caption"] or None)  # empty cell: no member, modality absent
        assert got[r["id"]]["meta"] == {"label": str(r["label"])}  # CSV cells are strings
    assert [s.samples for s in index.shards] == [5, 5, 2]
    assert index.modalities == {"bin": 12, "json": 12, "txt": 11}


def test_jsonl_manifest_round_trip_keeps_types_and_numbers_rows(media: list[dict], tmp_path: Path) -> None:
    lines = [json.dumps({"path": r["path"], "caption": r["caption"], "label": r["label"], "tags": [r["id"]]})
             for r in media]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines[:6]) + "\n\n" + "\n".join(lines[6:]) + "\n")  # a blank line is skipped
    build_from_manifest(manifest, tmp_path / "out", columns={"path": "file:bin", "caption": "text:caption"},
                        shard_size=100)
    got = _read_back(tmp_path / "out")
    assert sorted(got) == [f"{n:09d}" for n in range(1, 13)]
    for n, r in enumerate(media, 1):
        sample = got[f"{n:09d}"]
        assert sample["blob"] == r["data"]
        assert sample["caption"] == (r["caption"] or None)
        assert sample["meta"] == {"label": r["label"], "tags": [r["id"]]}


def test_output_is_identical_for_any_number_of_workers(media: list[dict], tmp_path: Path) -> None:
    manifest = _write_csv(tmp_path / "m.csv", media)
    outs = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        build_from_manifest(manifest, out, columns={"path": "file", "caption": "text"}, key="id", shard_size=3,
                            max_bytes=8000, workers=workers)
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert len(outs[0]) > 3
    assert outs[0] == outs[1] == outs[2]


def _tar_size(members: dict[str, int]) -> int:
    return sum(512 + -(-size // 512) * 512 for size in members.values())


def test_count_and_byte_bounds_and_index_equal_a_direct_count(media: list[dict], tmp_path: Path) -> None:
    manifest = _write_csv(tmp_path / "m.csv", media)
    max_count, max_bytes = 4, 7000
    index = build_from_manifest(manifest, tmp_path / "out", columns={"path": "file", "caption": "text"}, key="id",
                                shard_size=max_count, max_bytes=max_bytes, workers=2)
    assert DatasetIndex.load(tmp_path / "out") == index
    order = [r["id"] for r in media]
    position = 0
    for shard in index.shards:
        path = tmp_path / "out" / shard.path
        direct = _tar_samples(path)
        assert list(direct) == order[position:position + shard.samples]  # manifest order, no sample lost
        position += shard.samples
        assert shard.samples == len(direct) <= max_count
        assert shard.bytes == path.stat().st_size <= max_bytes
        assert path.stat().st_size == sum(_tar_size(m) for m in direct.values()) + 1024  # exact tar layout
        counts: dict[str, int] = {}
        for members in direct.values():
            for ext in members:
                counts[ext] = counts.get(ext, 0) + 1
        assert shard.modalities == counts
        if position < len(order):  # greedy: the next sample would have broken a bound
            next_size = _tar_size(_tar_samples_for(media[position]))
            assert shard.samples == max_count or path.stat().st_size + next_size > max_bytes
    assert position == len(order)


def _tar_samples_for(row: dict) -> dict[str, int]:
    meta = json.dumps({"label": str(row["label"])}).encode()
    return {"bin": len(row["data"]), "json": len(meta), **({"txt": len(row["caption"].encode())} if row["caption"]
                                                           else {})}


def test_folder_tree_groups_by_stem_with_parent_labels(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    files = {"cat/a.jpg": b"A", "cat/a.txt": b"a cat", "cat/b.jpg": b"B", "dog/sub/c.jpg": b"C",
             "dog/sub/c.json": b'{"source": "x"}', "dog/README": b"no extension", "dog/.DS_Store": b"hidden"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    index = build_from_folder(root, tmp_path / "out", label_field="label", shard_size=2)
    direct = {}
    for shard in index.shards:
        with tarfile.open(tmp_path / "out" / shard.path) as tar:
            direct.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    assert sorted(direct) == ["cat/a.jpg", "cat/a.json", "cat/a.txt", "cat/b.jpg", "cat/b.json", "dog/sub/c.jpg",
                              "dog/sub/c.json"]
    assert direct["cat/a.txt"] == b"a cat" and direct["dog/sub/c.jpg"] == b"C"
    assert json.loads(direct["cat/b.json"]) == {"label": "cat"}
    assert json.loads(direct["dog/sub/c.json"]) == {"source": "x", "label": "sub"}  # merged into the file's own
    assert index.total_samples == 3 and index.info["skipped"] == {"no_extension": 1}
    with pytest.raises(DataError, match="top of the folder"):
        (root / "top.jpg").write_bytes(b"T")
        build_from_folder(root, tmp_path / "out2", label_field="label")


def test_iterator_source_reads_paths_and_encodes_values(tmp_path: Path) -> None:
    (tmp_path / "x.wav").write_bytes(b"RIFF....")
    samples = [{"__key__": "k1", "wav": tmp_path / "x.wav", "txt": "hi", "json": {"a": 1}},
               {"__key__": "k2", "bin": b"\x00\x01"}]
    index = build_from_iterator(samples, tmp_path / "out", name="toy")
    with tarfile.open(tmp_path / "out" / index.shards[0].path) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert got == {"k1.json": b'{"a": 1}', "k1.txt": b"hi", "k1.wav": b"RIFF....", "k2.bin": b"\x00\x01"}
    with pytest.raises(DataError, match=r"sample 0 \('k'\), member \.npy: a int is not bytes"):
        build_from_iterator([{"__key__": "k", "npy": 3}], tmp_path / "bad")


def test_bad_input_names_the_manifest_row_and_value(media: list[dict], tmp_path: Path) -> None:
    media[2]["path"] = "media/gone.bin"
    manifest = _write_csv(tmp_path / "m.csv", media)
    columns = {"path": "file", "caption": "text"}
    with pytest.raises(DataError, match=r"m\.csv row 3 \(line 4\), column 'path': file 'media/gone\.bin' not found"):
        build_from_manifest(manifest, tmp_path / "out", columns=columns, key="id")
    assert not list((tmp_path / "out").glob("*")), "a failed build leaves nothing behind"
    index = build_from_manifest(manifest, tmp_path / "out", columns=columns, key="id", skip_missing=True)
    assert index.total_samples == 11 and index.info["skipped"] == {"missing_file": 1}
    assert "gone.bin" in index.info["skipped_examples"][0]
    with pytest.raises(DataError, match=r"m\.csv: no column 'image'"):
        build_from_manifest(manifest, tmp_path / "o2", columns={"image": "file"})
    with pytest.raises(DataError, match=r"column spec 'picture'"):
        build_from_manifest(manifest, tmp_path / "o2", columns={"path": "picture"})
    media[2]["path"], media[7]["id"] = "media/f2.bin", "s01"
    dup = _write_csv(tmp_path / "dup.csv", media)
    with pytest.raises(DataError, match=r"dup\.csv row 8 \(line 9\): duplicate sample key 's01' \(first at .*row 2 "):
        build_from_manifest(dup, tmp_path / "o3", columns=columns, key="id")


def test_parquet_without_pyarrow_names_the_package(tmp_path: Path) -> None:
    if importlib.util.find_spec("pyarrow") is not None:
        pytest.skip("pyarrow is installed")
    (tmp_path / "m.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"m\.parquet: reading a \.parquet manifest needs the pyarrow package"):
        build_from_manifest(tmp_path / "m.parquet", tmp_path / "out", columns={"path": "file"})


# ------------------------------------------------------------------------------------------------ inspecting
def _shards(media: list[dict], tmp_path: Path) -> tuple[Path, DatasetIndex]:
    manifest = _write_csv(tmp_path / "m.csv", media)
    index = build_from_manifest(manifest, tmp_path / "out", columns={"path": "file", "caption": "text"}, key="id",
                                shard_size=3)
    return tmp_path / "out", index


def test_inspect_reports_exactly_the_truncated_shard_and_the_corrupt_member(media: list[dict],
                                                                          tmp_path: Path) -> None:
    out, index = _shards(media, tmp_path)
    clean = inspect_shards(str(out))
    assert clean.ok and clean.total_samples == 12
    truncated, corrupted = out / index.shards[1].path, out / index.shards[2].path
    with tarfile.open(truncated) as tar:  # cut inside the 2nd sample's .bin data
        members = tar.getmembers()
    victim = next(m for m in members if m.name.endswith(".bin") and m.size > 100 and m.name != members[0].name)
    cut = victim.offset_data + victim.size // 2
    truncated.write_bytes(truncated.read_bytes()[:cut])
    with tarfile.open(corrupted) as tar:  # overwrite one .json member in place, same length: not JSON any more
        bad_json = next(m for m in tar.getmembers() if m.name.endswith(".json"))
    data = bytearray(corrupted.read_bytes())
    data[bad_json.offset_data:bad_json.offset_data + bad_json.size] = b"\xff" * bad_json.size
    corrupted.write_bytes(bytes(data))

    report = inspect_shards(str(out))
    assert not report.ok
    assert report.bad_shards() == sorted([str(truncated), str(corrupted)])
    kinds = {(p.kind, Path(p.shard).name, p.key, p.member) for p in report.problems}
    bad_key = bad_json.name.split(".")[0]
    assert ("truncated", truncated.name, victim.name.split(".")[0], "bin") in kinds
    assert ("undecodable", corrupted.name, bad_key, "json") in kinds
    assert ("index_mismatch", truncated.name, None, None) in kinds  # fewer samples and bytes than index.json says
    assert len(kinds) == 3
    # per-extension totals: every member of the intact shards, and the truncated shard's members read in full
    expected: dict[str, list[int]] = {}
    for shard in index.shards:
        data = (out / shard.path).read_bytes()
        if shard.path == truncated.name:  # zero-fill the cut so tarfile lists the members the shard had before it
            data += b"\0" * (shard.bytes - len(data))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for m in tar.getmembers():
                if shard.path == truncated.name and m.offset_data + m.size > cut:
                    continue
                totals = expected.setdefault(m.name.split(".", 1)[1], [0, 0])
                totals[0], totals[1] = totals[0] + 1, totals[1] + m.size
    assert {e: [t.members, t.bytes] for e, t in report.extensions.items()} == expected


def test_inspect_catches_cuts_and_bad_headers_tarfile_passes_over_silently(media: list[dict], tmp_path: Path) -> None:
    out, index = _shards(media, tmp_path)
    first, second = out / index.shards[0].path, out / index.shards[1].path
    with tarfile.open(first) as tar:
        boundary = tar.getmembers()[3].offset  # a header boundary: tarfile just sees a shorter archive
    first.write_bytes(first.read_bytes()[:boundary])
    with tarfile.open(second) as tar:
        header = tar.getmembers()[2].offset
    data = bytearray(second.read_bytes())
    data[header:header + 100] = b"x" * 100  # the member name field: the header checksum no longer matches
    second.write_bytes(bytes(data))
    report = inspect_shards(f"{out}/shard-{{000000..000001}}.tar")
    kinds = {(p.kind, Path(p.shard).name) for p in report.problems}
    assert ("truncated", first.name) in kinds and ("corrupt_tar", second.name) in kinds
    assert {k for k, _ in kinds} == {"truncated", "corrupt_tar", "index_mismatch"}


# ------------------------------------------------------------------------------------------------ CLI
def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(list(argv))
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def test_cli_exit_codes(media: list[dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    manifest = _write_csv(tmp_path / "m.csv", media)
    out = tmp_path / "out"
    code, stdout, _ = _cli(capsys, "make-shards", "manifest", "--manifest", str(manifest), "--out", str(out),
                           "--column", "path=file", "--column", "caption=text", "--key", "id", "--shard-size", "5",
                           "--max-bytes", "1M", "--workers", "2")
    assert code == 0 and "12 samples in 3 shards" in stdout
    code, stdout, _ = _cli(capsys, "inspect-shards", str(out), "--json", str(tmp_path / "r.json"))
    assert code == 0 and json.loads((tmp_path / "r.json").read_text())["total_samples"] == 12

    code, _, stderr = _cli(capsys, "make-shards", "manifest", "--manifest", str(manifest), "--out", str(out),
                           "--column", "path=file", "--key", "nope")
    assert code == 2 and stderr.strip() == f"mmssl: error: manifest {manifest}: no column 'nope' (columns: " \
                                           f"['id', 'path', 'caption', 'label'])"
    code, _, stderr = _cli(capsys, "make-shards", "asterisk", "--out", str(out), "--workers", "2")
    assert code == 2 and "--workers applies to `make-shards manifest / folder`" in stderr
    code, _, stderr = _cli(capsys, "make-shards", "fashion-mnist", "--out", str(out), "--languages", "fr")
    assert code == 2 and "--languages applies to `make-shards ktuberling`, not to `make-shards fashion-mnist`" in stderr
    code, _, stderr = _cli(capsys, "weights", "efficientnet-lite0", "--out", str(out), "--layers", "3")
    assert code == 2 and "--layers applies to `weights random-causal-lm`" in stderr
    code, _, stderr = _cli(capsys, "weights", "random-causal-lm", "--out", str(out))
    assert code == 2 and "needs --tokenizer FILE" in stderr

    root = tmp_path / "tree" / "red"
    root.mkdir(parents=True)
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(png, format="PNG")
    (root / "good.png").write_bytes(png.getvalue())
    (root / "bad.png").write_bytes(b"\x89PNG not really")
    code, _, _ = _cli(capsys, "make-shards", "folder", "--root", str(tmp_path / "tree"), "--out", str(tmp_path / "img"),
                      "--label", "color")
    assert code == 0
    code, stdout, _ = _cli(capsys, "inspect-shards", str(tmp_path / "img"))  # PNG bytes are not decoded by default
    assert code == 0
    code, stdout, _ = _cli(capsys, "inspect-shards", str(tmp_path / "img"), "--decode", "--json",
                           str(tmp_path / "img.json"))
    problems = json.loads((tmp_path / "img.json").read_text())["problems"]
    assert code == 1 and [(p["kind"], p["key"], p["member"]) for p in problems] == [("undecodable", "red/bad", "png")]
    assert "undecodable" in stdout and "red/bad" in stdout

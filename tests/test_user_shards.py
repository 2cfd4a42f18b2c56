"""Shards as users have them: a directory of img2dataset-layout tars (``00000.tar`` + ``00000.parquet`` +
``00000_stats.json``, no index.json) trains as it is (continuous, resampled); ``mmssl index-shards`` writes its
index.json (from img2dataset's stats, checked against the tars, or by counting), after which exact epochs see every
sample once; a URL scheme webdataset cannot open is refused before launch with the ``pipe:`` form that streams it.

The tars hold real Fashion-MNIST images (re-encoded as JPEG, as img2dataset stores them) with their captions, written
by webdataset's own TarWriter in img2dataset's naming: shard ``s`` holds keys ``s·10⁴ + row`` (9 digits), the rows
that failed to download leave gaps, and its ``_stats.json`` counts them as img2dataset's ``write_stats`` does.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from mmssl.data_pipelines.indexing import index_directory
from mmssl.data_pipelines.inspect import inspect_shards
from mmssl.data_pipelines.reader import ShardReader
from mmssl.data_pipelines.shards import DataError, DatasetIndex, check_url, resolve_shards
from mmssl.data_pipelines.stream import ShardStream, read_once
from tests.conftest import mmssl_in_process
from tests.helpers.train_many import Job, run_jobs

SIZES = (8, 8, 7, 8, 6, 8)  # samples per shard: 45 in 6 shards (2 ranks x 2 streams = 4 readers)
FAILED_ROWS = (2, 5)  # rows of each shard that "failed to download": img2dataset leaves their keys out


def _jpeg(png: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).save(out, format="JPEG", quality=95)
    return out.getvalue()


def write_img2dataset(out: Path, samples: list[dict], sizes: tuple[int, ...] = SIZES) -> dict[str, list[str]]:
    """img2dataset's webdataset output for ``samples`` (fashion shards' members); returns shard name -> keys."""
    out.mkdir(parents=True)
    keys: dict[str, list[str]] = {}
    it = iter(samples)
    for shard, n in enumerate(sizes):
        name, rows = f"{shard:05d}", [r for r in range(n + len(FAILED_ROWS)) if r not in FAILED_ROWS]
        keys[f"{name}.tar"] = [f"{shard:05d}{row:04d}" for row in rows]
        with wds.TarWriter(str(out / f"{name}.tar")) as sink:
            for key in keys[f"{name}.tar"]:
                sample = next(it)
                meta = json.loads(sample["json"])
                caption = sample["txt"].decode()
                sink.write({"__key__": key, "jpg": _jpeg(sample["png"]), "txt": caption,
                            "json": {"key": key, "status": "success", "caption": caption, "label": meta["label_id"],
                                     "url": f"fashion-mnist/train/{meta['index']}", "width": 28, "height": 28,
                                     "original_width": 28, "original_height": 28, "error_message": None}})
        (out / f"{name}.parquet").write_bytes(b"")
        (out / f"{name}_stats.json").write_text(json.dumps({
            "count": n + len(FAILED_ROWS), "successes": n, "failed_to_download": len(FAILED_ROWS),
            "failed_to_resize": 0, "duration": 0.5, "start_time": 0.0, "end_time": 0.5,
            "status_dict": {"success": n, "Max retries exceeded": len(FAILED_ROWS)}}, indent=4))
    return keys


def tar_samples(path: Path) -> tuple[int, dict[str, int]]:
    """Samples and per-extension counts read with Python's tarfile (independent of mmssl and webdataset)."""
    keys: dict[str, set[str]] = {}
    with tarfile.open(path) as tar:
        for name in tar.getnames():
            key, ext = name.split(".", 1)
            keys.setdefault(key, set()).add(ext)
    exts: dict[str, int] = {}
    for found in keys.values():
        for ext in found:
            exts[ext] = exts.get(ext, 0) + 1
    return len(keys), exts


@pytest.fixture(scope="module")
def user_shards(fashion: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """(img2dataset directory, shard -> keys, the captions' sentencepiece model)."""
    train, spm = fashion
    reader = ShardReader(where="test")
    samples = [s for url in resolve_shards(str(train)) for _, s in reader.samples(url)][: sum(SIZES)]
    out = tmp_path_factory.mktemp("img2dataset") / "laion-like"
    return out, write_img2dataset(out, samples), spm


def error_lines(stderr: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]", stderr) if line.startswith("mmssl: error:")]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_directory_of_tars_without_index_resolves_to_its_tars_and_exact_asks_for_index_shards(
        user_shards: tuple[Path, dict, Path]) -> None:
    data, keys, _ = user_shards
    assert not (data / "index.json").exists()
    assert resolve_shards(str(data), where="data.train") == [str(data / name) for name in sorted(keys)]
    assert resolve_shards(f"file://{data}/00001.tar") == [str(data / "00001.tar")]
    with pytest.raises(DataError, match=r"data\.train: data\.sampling=exact needs samples per shard.*"
                                        r"`mmssl index-shards DIR`"):
        ShardStream(resolve_shards(str(data)), fields={"text": ["txt"]}, decoders={"text": bytes.decode},
                    batch_size=4, sampling="exact", where="data.train")


def test_index_shards_takes_counts_from_stats_checked_and_counts_tars_without_them(
        user_shards: tuple[Path, dict, Path], tmp_path: Path) -> None:
    data = _copy(user_shards[0], tmp_path / "shards")
    for name in ("00001", "00004"):  # shards img2dataset never finished writing stats for
        (data / f"{name}_stats.json").unlink()
    done = mmssl_in_process("index-shards", str(data))
    assert done.returncode == 0, done.stderr
    assert "45 samples in 6 shards (4 from _stats.json, 2 from reading the tar)" in done.stdout
    index = DatasetIndex.load(data)
    assert [s.path for s in index.shards] == [f"{i:05d}.tar" for i in range(6)]
    for shard in index.shards:
        samples, exts = tar_samples(data / shard.path)
        assert (shard.samples, shard.modalities) == (samples, exts)
        assert shard.bytes == (data / shard.path).stat().st_size
    assert [s.samples for s in index.shards] == list(SIZES)
    assert index.info["counted_from"] == {"stats": 4, "tar": 2}
    assert index.info["img2dataset_stats"]["failed_to_download"] == 4 * len(FAILED_ROWS)
    assert inspect_shards(str(data)).ok  # the index agrees with every member of every tar
    again = mmssl_in_process("index-shards", str(data))
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
    recount = index_directory(data, recount=True, overwrite=True, workers=2)
    assert recount.shards == index.shards and recount.info["counted_from"] == {"tar": 6}


def test_stats_that_disagree_with_the_tar_are_an_error_naming_the_shard(user_shards: tuple[Path, dict, Path],
                                                                        tmp_path: Path) -> None:
    data = _copy(user_shards[0], tmp_path / "shards")
    stats = json.loads((data / "00002_stats.json").read_text())
    (data / "00002_stats.json").write_text(json.dumps({**stats, "successes": stats["successes"] + 1}))
    done = mmssl_in_process("index-shards", str(data))
    (error,) = error_lines(done.stderr)  # one error line (beside the progress bar's)
    assert done.returncode == 2
    assert f"{data / '00002.tar'}: 00002_stats.json says 8 successes, found 7 sample(s) in the tar" in error
    assert "--recount" in done.stderr and not (data / "index.json").exists()
    (data / "00002_stats.json").write_text(json.dumps(stats))
    whole = (data / "00003.tar").read_bytes()  # cut inside the last sample's image: the tar is short, stats are not
    with tarfile.open(data / "00003.tar") as tar:
        last = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1]
    (data / "00003.tar").write_bytes(whole[: last.offset_data + 10])
    done = mmssl_in_process("index-shards", str(data))
    assert done.returncode == 2 and "00003_stats.json says 8 successes, found 7 sample(s) in the tar before a " \
                                    "fault: member" in done.stderr and "past the end of the file" in done.stderr
    (data / "00003_stats.json").unlink()  # without stats the tar is counted as the training stream reads it
    index = index_directory(data)
    streamed = sum(len(b) for b in read_once([str(data / "00003.tar")], fields={"text": ["txt"]},
                                             decoders={"text": bytes.decode}, batch_size=1))
    assert index.shards[3].samples == streamed == 7
    assert [(f["kind"], Path(f["shard"]).name) for f in index.info["faults"]] == [("tar_errors", "00003.tar")]


def test_unsupported_url_schemes_are_refused_with_the_pipe_form(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"^data\.train: 's3://bucket/x-\{0\.\.3\}\.tar' uses the s3:// scheme, which "
                                        r"webdataset cannot open .*'pipe:aws s3 cp s3://bucket/x-\{0\.\.3\}\.tar -'$"):
        resolve_shards("s3://bucket/x-{0..3}.tar", where="data.train")  # the pattern streams every shard
    check_url("file:/x.tar", "data.train")  # local files, file: URLs and pipe: commands need no handler
    check_url("pipe:aws s3 cp s3://bucket/x.tar -", "data.train")
    with pytest.raises(DataError, match=r"'az://c/x\.tar' uses the az:// scheme.*'pipe:COMMAND, any command"):
        resolve_shards("az://c/x.tar")
    assert resolve_shards(["pipe:cat /x.tar", "https://host/y.tar"]) == ["pipe:cat /x.tar", "https://host/y.tar"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no gsutil: webdataset's gs:// handler could not run
    with pytest.raises(DataError, match=r"webdataset opens gs:// with `gsutil`, which is not on PATH.*'pipe:gcloud "
                                        r"storage cat gs://b/x\.tar'"):
        resolve_shards("gs://b/x.tar", where="data.eval")


def test_pretrain_refuses_an_s3_url_before_launch(fashion: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = mmssl_in_process("pretrain", "clip-tiny", "data.train=s3://bucket/x.tar",
                            f"model.text.tokenizer={fashion[1]}", "--run-dir", str(run))
    assert done.returncode == 2
    assert done.stderr.strip() == ("mmssl: error: data.train: 's3://bucket/x.tar' uses the s3:// scheme, which "
                                   "webdataset cannot open (it opens local paths and " + done.stderr.split(
                                       "local paths and ", 1)[1].split(")", 1)[0] + "); stream it through a command "
                                   "instead: 'pipe:aws s3 cp s3://bucket/x.tar -'")
    assert not run.exists()  # refused before the run directory or any rank


def _keys(run: Path) -> list[list[str]]:
    return [[k for line in (run / "keys" / f"rank{r}.jsonl").read_text().splitlines()
             for k in json.loads(line)["keys"]] for r in (0, 1)]


@pytest.mark.distributed
def test_img2dataset_directory_trains_continuous_resampled_and_after_index_shards_exact(
        user_shards: tuple[Path, dict, Path], tmp_path: Path) -> None:
    data, keys, spm = user_shards
    indexed = _copy(data, tmp_path / "indexed")
    (indexed / "00005_stats.json").unlink()  # one shard counted, five from stats
    assert mmssl_in_process("index-shards", str(indexed)).returncode == 0
    common = [f"model.text.tokenizer={spm}", "data.batch_size=8", "data.shuffle_buffer=8", "data.num_workers=0",
              "data.streams_per_rank=2", "train.log_every=1", "train.ckpt_every=0", "train.tensorboard=false",
              "train.log_keys=true", "train.warmup_steps=1"]
    # exact: 45 samples over 4 readers (11, 11, 11, 12) -> P = ceil(12 / 8) = 2 batches per stream, 4 steps per rank
    jobs = [Job("clip-tiny", [f"data.train={data}", "data.sampling=continuous", "train.steps=3", *common],
                str(tmp_path / "continuous")),
            Job("clip-tiny", [f"data.train={data}", "data.sampling=resampled", "train.steps=3", *common],
                str(tmp_path / "resampled")),
            Job("clip-tiny", [f"data.train={indexed}", "data.sampling=exact", "train.steps=4", *common],
                str(tmp_path / "exact"))]
    results = run_jobs(jobs, nproc=2)
    assert results == {j.run_dir: None for j in jobs}, results
    every = {k for ks in keys.values() for k in ks}
    for mode in ("continuous", "resampled"):
        run = tmp_path / mode
        seen = _keys(run)
        summary = json.loads((run / "summary.json").read_text())
        assert all(len(s) == 3 * 8 for s in seen) and set(seen[0] + seen[1]) <= every
        assert summary["rows_per_source"] == {"train": 2 * 3 * 8} and summary["data_errors"] == {}
    seen = _keys(tmp_path / "exact")
    real = [k for k in seen[0] + seen[1] if k]
    summary = json.loads((tmp_path / "exact" / "summary.json").read_text())
    assert sorted(real) == sorted(every)  # each sample exactly once in the epoch
    assert summary["steps_per_exact_epoch"] == 4
    assert summary["rows_per_source"] == {"train": 45, "(padding)": 2 * 4 * 8 - 45}

"""Shard writing, the index file, the Asterisk converter, and faults: missing, truncated and corrupt shards."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch

from mmssl.architectures.modalities import get_modality
from mmssl.data_pipelines.shard_plan import write_shards
from mmssl.data_pipelines.shards import DataError, DatasetIndex, resolve_shards
from mmssl.data_pipelines.sources import asterisk
from mmssl.data_pipelines.stream import read_once

TEXT_ONLY = {"text": ["txt"]}


@pytest.fixture
def text_decoder(asterisk_data: Path):
    plugin = get_modality("text")
    return {"text": plugin.decoder(plugin.config_cls(tokenizer=str(asterisk_data / "spm.model")), train=False)}


def _tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_index_counts_match_the_tar_contents(tmp_path: Path) -> None:
    samples = [{"__key__": f"s{i:03d}", "txt": f"sample {i}", **({"json": {"i": i}} if i % 3 == 0 else {})}
               for i in range(25)]
    index = write_shards(samples, tmp_path, name="toy", max_count=10)
    assert [s.samples for s in index.shards] == [10, 10, 5]
    reloaded = DatasetIndex.load(tmp_path)
    assert reloaded == index
    for shard in index.shards:
        members = _tar_members(tmp_path / shard.path)
        assert len({m.split(".")[0] for m in members}) == shard.samples
        assert shard.modalities["txt"] == sum(m.endswith(".txt") for m in members)
        assert shard.modalities.get("json", 0) == sum(m.endswith(".json") for m in members)
        assert shard.bytes == (tmp_path / shard.path).stat().st_size
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_rejects_bad_keys(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"sample key 'a\.b' is empty or contains '\.'"):
        write_shards([{"__key__": "a.b", "txt": "x"}], tmp_path / "dots", name="x")
    with pytest.raises(DataError, match="duplicate sample key 'k'"):
        write_shards([{"__key__": "k", "txt": "x"}, {"__key__": "k", "txt": "y"}], tmp_path / "dup", name="x")


def test_missing_shards_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.train: shard not found: .*/a-000001\.tar"):
        resolve_shards(str(tmp_path / "a-{000001..000002}.tar"), where="data.train")
    with pytest.raises(DataError, match=r"--shards: .* has no index\.json"):
        resolve_shards(str(tmp_path), where="--shards")


def test_asterisk_families_split_and_tokenizer(asterisk_data: Path, text_decoder: dict) -> None:
    train, test = DatasetIndex.load(asterisk_data / "train"), DatasetIndex.load(asterisk_data / "test")
    assert train.total_samples + test.total_samples == 200
    assert train.info["license"].startswith("CC-BY-SA-3.0")
    texts = {}
    for split in ("train", "test"):
        for batch in read_once(resolve_shards(str(asterisk_data / split)), fields=TEXT_ONLY,
                               decoders=text_decoder, batch_size=64):
            for text, family, prompt in zip(batch.meta["text"], batch.meta["family"], batch.meta["prompt"],
                                            strict=True):
                texts.setdefault(text, set()).add(split)
                assert family in train.info["classes"]
                expected = asterisk.prompt_prefix(prompt)
                assert family in (expected, "other")
    assert all(len(splits) == 1 for splits in texts.values())  # identical transcripts never straddle the split
    assert (asterisk_data / "spm.model").is_file()


def test_family_label_definition() -> None:
    assert asterisk.prompt_prefix("digits/7") == "digits"
    assert asterisk.prompt_prefix("vm-intro") == "vm"
    assert asterisk.prompt_prefix("conf-full") == asterisk.prompt_prefix("confbridge-join") == "conference"
    labels = asterisk.family_labels([f"digits/{i}" for i in range(10)] + ["vm-a", "beep_x"])
    assert labels["digits/3"] == "digits" and labels["vm-a"] == "other" and labels["beep_x"] == "other"


def _copy_with_truncation(src: Path, dst: Path, keep_fraction: float) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep_fraction)])


def test_truncated_tar_is_skipped_counted_and_named(asterisk_data: Path, tmp_path: Path, text_decoder: dict,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    src = sorted((asterisk_data / "test").glob("shard-*.tar"))[0]
    whole = sum(1 for _ in read_once([str(src)], fields=TEXT_ONLY, decoders=text_decoder,
                                     batch_size=1))
    bad = tmp_path / "truncated.tar"
    _copy_with_truncation(src, bad, 0.5)
    with caplog.at_level(logging.WARNING, logger="mmssl.data"):
        batches = list(read_once([str(bad)], fields=TEXT_ONLY, decoders=text_decoder, batch_size=1))
    stats = {k: sum(b.stats.get(k, 0) for b in batches) for k in ("tar_errors", "unreadable_shards")}
    assert stats["tar_errors"] == 1
    assert 0 < len(batches) < whole
    assert any(str(bad) in rec.getMessage() for rec in caplog.records)


def test_missing_shard_at_run_time_is_counted(asterisk_data: Path, tmp_path: Path, text_decoder: dict) -> None:
    good = sorted((asterisk_data / "test").glob("shard-*.tar"))[0]
    gone = tmp_path / "deleted.tar"
    gone.write_bytes(good.read_bytes())
    urls = resolve_shards([str(good), str(gone)])
    gone.unlink()
    batches = list(read_once(urls, fields=TEXT_ONLY, decoders=text_decoder, batch_size=100))
    assert sum(b.stats.get("unreadable_shards", 0) for b in batches) == 1
    assert sum(len(b) for b in batches) == DatasetIndex.load(asterisk_data / "test").shards[0].samples


def test_corrupt_member_marks_modality_absent_and_counts(asterisk_data: Path, tmp_path: Path,
                                                         text_decoder: dict) -> None:
    src = sorted((asterisk_data / "test").glob("shard-*.tar"))[0]
    out = tmp_path / "corrupt.tar"
    with tarfile.open(src) as tin, tarfile.open(out, "w") as tout:
        members = tin.getmembers()
        first_wav = next(m for m in members if m.name.endswith(".wav"))
        for m in members:
            data = tin.extractfile(m).read()
            if m.name == first_wav.name:
                data = b"RIFF" + b"\x00" * 40  # a WAV header that cannot be parsed
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    audio = get_modality("audio")
    decoder = audio.decoder(audio.config_cls(frames=32), train=False)
    batches = list(read_once([str(out)], fields={"audio": ["wav"], "text": ["txt"]},
                             decoders={"audio": decoder, **text_decoder}, batch_size=64))
    (batch,) = batches
    bad_key = first_wav.name.split(".")[0]
    row = batch.keys.index(bad_key)
    assert not batch.present["audio"][row] and batch.present["text"][row]
    assert int(batch.present["audio"].sum()) == len(batch) - 1
    assert batch.stats == {"decode_errors": 1}
    assert json.dumps(batch.stats)


def test_fashion_mnist_shards_keep_the_original_pixels(tmp_path: Path) -> None:
    from mmssl.data_pipelines.sources import fashion_mnist

    indexes = fashion_mnist.build(tmp_path, limit=60, shard_size=25)
    assert indexes["train"].total_samples == 60 and len(indexes["train"].shards) == 3
    images, labels = fashion_mnist.load_split("train")
    image = get_modality("image")
    cfg = image.config_cls(image_size=28, in_chans=1, mean=[0.0], std=[1.0])
    batches = list(read_once(resolve_shards(str(tmp_path / "train")), fields={"image": ["png"]},
                             decoders={"image": image.decoder(cfg, train=False)}, batch_size=64))
    captions = {}
    for shard in sorted((tmp_path / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            captions.update({m.name.split(".")[0]: tar.extractfile(m).read().decode()
                             for m in tar.getmembers() if m.name.endswith(".txt")})
    (batch,) = batches
    for row, (index, label) in enumerate(zip(batch.meta["index"], batch.meta["label"], strict=True)):
        assert label == fashion_mnist.CLASSES[labels[index]]
        assert captions[batch.keys[row]] == fashion_mnist.TEMPLATES[index % len(fashion_mnist.TEMPLATES)].format(label)
        restored = (batch.inputs["image"][row, 0] * 255).round().to(torch.uint8).numpy()
        assert (restored == images[index]).all()

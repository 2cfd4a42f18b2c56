"""The stream's order is a pure function of its settings: resume at any batch, any worker count, exact."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from mmssl.architectures.modalities import get_modality
from mmssl.data_pipelines.cursors import SourceCursor
from mmssl.data_pipelines.shards import DataError, DatasetIndex, resolve_shards
from mmssl.data_pipelines.stream import ShardStream, make_loader


def _stream(data: Path, **kw) -> ShardStream:
    text = get_modality("text")
    audio = get_modality("audio")
    decoders = {
        "text": text.decoder(text.config_cls(tokenizer=str(data / "spm.model"), max_len=8), train=True),
        "audio": audio.decoder(audio.config_cls(frames=16, crop="random", spec_augment=True), train=True),
    }
    settings = {"batch_size": 4, "seed": 7, "shuffle_buffer": 8, "streams_per_rank": 2, "rank": 0, "world_size": 2}
    settings.update(kw)
    return ShardStream(resolve_shards(str(data / "train")), fields={"text": ["txt"], "audio": ["wav"]},
                       decoders=decoders, **settings)


def _take(stream: ShardStream, n: int, workers: int = 0) -> list:
    return list(itertools.islice(iter(make_loader(stream, num_workers=workers)), n))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_at_any_batch_continues_the_same_samples(asterisk_data: Path, workers: int) -> None:
    full = _take(_stream(asterisk_data), 14)
    resumed = _take(_stream(asterisk_data, start_batch=9), 5, workers=workers)
    assert [b.index for b in full] == list(range(14))
    assert [b.index for b in resumed] == list(range(9, 14))
    for a, b in zip(full[9:], resumed, strict=True):
        assert a.keys == b.keys
        # augmentation is seeded per sample, so the decoded tensors are identical too
        assert (a.inputs["audio"] == b.inputs["audio"]).all()
        assert (a.inputs["text"]["input_ids"] == b.inputs["text"]["input_ids"]).all()


def test_ranks_read_disjoint_shards_and_cover_the_epoch(asterisk_data: Path) -> None:
    index = DatasetIndex.load(asterisk_data / "train")
    seen: list[str] = []
    for rank in (0, 1):
        stream = _stream(asterisk_data, rank=rank)
        for v in range(stream.streams_per_rank):
            cursor = SourceCursor(stream.sources[0], 0, reader=stream.reader, sampling="continuous", seed=7,
                                  reader_id=rank * 2 + v, readers=4)
            while (raw := cursor.next()).epoch == 0:
                seen.append(raw.key)
    assert len(seen) == len(set(seen)) == index.total_samples


def test_shard_order_changes_per_epoch_and_seed(asterisk_data: Path) -> None:
    s = _stream(asterisk_data)
    assert s.shard_order(0) != s.shard_order(1)
    assert _stream(asterisk_data, seed=8).shard_order(0) != s.shard_order(0)


def test_workers_must_divide_streams(asterisk_data: Path) -> None:
    with pytest.raises(DataError, match=r"3 DataLoader workers must divide data\.streams_per_rank=2"):
        next(iter(make_loader(_stream(asterisk_data), num_workers=3)))


def test_too_few_shards_is_a_clear_error(asterisk_data: Path) -> None:
    with pytest.raises(DataError, match=r"cannot feed 2 rank\(s\) x 64 stream\(s\) per rank"):
        _stream(asterisk_data, streams_per_rank=64)

"""Stream positions, sampling modes and weighted sources, on the real Asterisk shards.

* resume from a recorded position (what a checkpoint stores) continues exactly, on any worker count, and reads
  far fewer samples than replaying the stream up to that point;
* ``sampling: exact``: over 2 ranks x 2 workers every sample is seen exactly once per epoch, with an uneven split
  (170 samples over 4 readers, batches of 4): policy rebalance + pad;
* ``sampling: resampled`` works with fewer shards than readers; ``continuous`` refuses that with a clear message;
* weighted ``sources`` with their own modalities: per-source counts follow the weights, rows carry only their
  source's modalities, and a modality no row carries is still in the batch (all rows absent).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from mmssl.architectures.modalities import get_modality
from mmssl.data_pipelines.reader import ShardReader
from mmssl.data_pipelines.shards import DataError, DatasetIndex, resolve_shards
from mmssl.data_pipelines.stream import PAD_KEY, ShardStream, Source, make_loader

FIELDS = {"text": ["txt"], "audio": ["wav"]}


def _decoders(data: Path) -> dict[str, Any]:
    text, audio = get_modality("text"), get_modality("audio")
    return {"text": text.decoder(text.config_cls(tokenizer=str(data / "spm.model"), max_len=8), train=True),
            "audio": audio.decoder(audio.config_cls(frames=16, crop="random", spec_augment=True), train=True)}


def _stream(data: Path, **kw: Any) -> ShardStream:
    settings: dict[str, Any] = {"batch_size": 4, "seed": 7, "shuffle_buffer": 8, "streams_per_rank": 2, "rank": 0,
                                "world_size": 2}
    settings.update(kw)
    urls = None if "sources" in kw else resolve_shards(str(data / "train"))
    return ShardStream(urls, fields=FIELDS, decoders=_decoders(data), **settings)


def _take(stream: ShardStream, n: int, workers: int = 0) -> list:
    return list(itertools.islice(iter(make_loader(stream, num_workers=workers)), n))


def _positions(batches: list, upto: int) -> dict[int, dict]:
    """What the trainer keeps: each virtual stream's position after the last batch it consumed before ``upto``."""
    found: dict[int, dict] = {}
    for b in batches[:upto]:
        found[b.position["stream"]] = b.position
    return found


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_a_recorded_position_continues_exactly(asterisk_data: Path, workers: int) -> None:
    full = _take(_stream(asterisk_data), 30)
    for start in (7, 24):  # mid first epoch; past it (each reader holds ~42 samples, 10 batches of 4)
        resumed = _take(_stream(asterisk_data, start_batch=start, positions=_positions(full, start)), 30 - start,
                        workers=workers)
        assert [b.index for b in resumed] == list(range(start, 30))
        for a, b in zip(full[start:], resumed, strict=True):
            assert a.keys == b.keys and a.position == b.position
            assert torch.equal(a.inputs["audio"], b.inputs["audio"])
            assert torch.equal(a.inputs["text"]["input_ids"], b.inputs["text"]["input_ids"])


def test_resume_from_a_position_reads_only_the_buffer_not_the_past(asterisk_data: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    full = _take(_stream(asterisk_data, shuffle_buffer=4), 40)
    reads = {"n": 0}
    original = ShardReader._read

    def counting(self: ShardReader, url: str):  # type: ignore[no-untyped-def]
        for sample in original(self, url):
            reads["n"] += 1
            yield sample

    monkeypatch.setattr(ShardReader, "_read", counting)
    costs = {}
    for mode, positions in (("position", _positions(full, 36)), ("replay", None)):
        reads["n"] = 0
        (first,) = _take(_stream(asterisk_data, shuffle_buffer=4, start_batch=36, positions=positions), 1)
        assert first.keys == full[36].keys
        costs[mode] = reads["n"]
    # replaying reads the ~18 batches x 4 samples stream 0 consumed before; a position re-reads at most the shards
    # of the 4 buffered samples and the cursor's shard up to its offset (8-sample shards)
    assert costs["replay"] >= 18 * 4
    assert costs["position"] <= 5 * 8 and costs["position"] * 2 < costs["replay"], costs


def _epoch_rows(data: Path, epochs: int) -> dict[int, list[tuple[str, dict[str, bool]]]]:
    rows: dict[int, list[tuple[str, dict[str, bool]]]] = {e: [] for e in range(epochs)}
    for rank in (0, 1):
        stream = _stream(data, rank=rank, sampling="exact")
        per_epoch = stream.batches_per_epoch()
        assert per_epoch == 2 * math.ceil(43 / 4)  # V x P: 170 samples over 4 readers -> 43 at most per reader
        for b in _take(stream, per_epoch * epochs, workers=2):
            for i, key in enumerate(b.keys):
                rows[b.index // per_epoch].append((key, {m: bool(p[i]) for m, p in b.present.items()}))
    return rows


def test_exact_epochs_see_every_sample_once_on_2_ranks_x_2_workers(asterisk_data: Path) -> None:
    keys = {k for s in DatasetIndex.load(asterisk_data / "train").shards for k in _shard_keys(asterisk_data, s.path)}
    assert len(keys) == 170  # 21 shards of 8 + one of 2: the split over 4 readers is uneven
    rows = _epoch_rows(asterisk_data, epochs=2)
    orders = []
    for epoch in (0, 1):
        real = [k for k, _ in rows[epoch] if k != PAD_KEY]
        assert len(real) == len(set(real)) == 170 and set(real) == keys
        pads = [present for k, present in rows[epoch] if k == PAD_KEY]
        assert len(pads) == 2 * 2 * 11 * 4 - 170  # rows of the epoch (ranks x V x P x B) minus the samples
        assert all(not any(p.values()) for p in pads)  # padding rows carry no modality: objectives ignore them
        orders.append(real)
    assert orders[0] != orders[1]  # a new shard order and shuffle each epoch


def test_exact_epoch_resumes_mid_epoch_and_across_the_padding(asterisk_data: Path) -> None:
    stream = _stream(asterisk_data, sampling="exact", shuffle_buffer=16)
    full = _take(stream, 30)  # the epoch boundary is at batch 22
    for start in (5, 21, 23):
        resumed = _take(_stream(asterisk_data, sampling="exact", shuffle_buffer=16, start_batch=start,
                                positions=_positions(full, start)), 30 - start, workers=1)
        assert [b.keys for b in resumed] == [b.keys for b in full[start:]]


def _shard_keys(data: Path, name: str) -> list[str]:
    reader = ShardReader(where="test")
    return [s["__key__"] for _, s in reader.samples(str(data / "train" / name))]


def test_resampled_feeds_more_readers_than_shards_and_continuous_refuses(asterisk_data: Path) -> None:
    urls = resolve_shards(str(asterisk_data / "train"))[:3]
    with pytest.raises(DataError, match=r"3 shard\(s\) cannot feed 2 rank\(s\) x 2 stream\(s\).*resampled"):
        _stream(asterisk_data, sources=[Source("few", tuple(urls))])
    a = _take(_stream(asterisk_data, sources=[Source("few", tuple(urls))], sampling="resampled"), 12)
    b = _take(_stream(asterisk_data, sources=[Source("few", tuple(urls))], sampling="resampled"), 12)
    assert [x.keys for x in a] == [x.keys for x in b]  # seeded
    allowed = {k for u in urls for k in _shard_keys(asterisk_data, Path(u).name)}
    assert {k for x in a for k in x.keys} <= allowed


def test_weighted_sources_follow_their_weights_and_modalities(asterisk_data: Path) -> None:
    urls = resolve_shards(str(asterisk_data / "train"))
    sources = [Source("pairs", tuple(urls[:10]), 0.5), Source("speech", tuple(urls[10:16]), 0.25, ("audio",)),
               Source("words", tuple(urls[16:]), 0.25, ("text",))]
    owner = {k: s.name for s in sources for u in s.urls for k in _shard_keys(asterisk_data, Path(u).name)}
    batches = _take(_stream(asterisk_data, sources=sources, batch_size=8, world_size=1), 60, workers=1)
    counts = {s.name: 0 for s in sources}
    for b in batches:
        for name in counts:
            counts[name] += b.stats.get(f"source_rows/{name}", 0)
        for i, key in enumerate(b.keys):
            src = owner[key]
            counts_row = {m: bool(b.present[m][i]) for m in ("audio", "text")}
            assert counts_row == {"audio": src != "words", "text": src != "speech"}, (key, src)
    n = 480
    for s in sources:  # multinomial: each count within 4 standard deviations of n·w (w / Σw)
        sd = math.sqrt(n * s.weight * (1 - s.weight))
        assert abs(counts[s.name] - n * s.weight) <= 4 * sd, counts
    assert sum(counts.values()) == n


def test_a_modality_no_row_carries_is_still_in_the_batch(asterisk_data: Path) -> None:
    urls = resolve_shards(str(asterisk_data / "train"))
    (batch,) = _take(_stream(asterisk_data, sources=[Source("words", tuple(urls), modalities=("text",))]), 1)
    assert not batch.present["audio"].any() and batch.present["text"].all()
    full = _take(_stream(asterisk_data), 1)[0]
    assert batch.inputs["audio"].shape == full.inputs["audio"].shape and not batch.inputs["audio"].any()


@pytest.mark.parametrize(("data", "message"), [
    ({"sampling": "shuffled"}, r"data\.sampling must be one of continuous, exact, resampled, got 'shuffled'"),
    ({"sources": [{"name": "a", "train": "TRAIN"}]}, r"data\.train and data\.sources are both set"),
    ({"train": "", "sources": [{"name": "a", "train": "TRAIN", "modalities": ["image"]}]},
     r"data\.sources\.0\.modalities: 'image' is not a tower of the model \(towers: \['audio', 'text'\]\)"),
    ({"train": "", "sources": [{"name": "a", "train": "TRAIN"}, {"name": "a", "train": "TRAIN"}]},
     r"data\.sources\.1\.name: 'a' is used twice"),
    ({"train": "", "sources": [{"name": "a", "train": "TRAIN", "weight": 0}]}, r"data\.sources\.0\.weight must be > 0"),
    ({"train": "", "sampling": "exact", "sources": [{"name": "a", "train": "TRAIN"}, {"name": "b", "train": "TRAIN"}]},
     r"data\.sampling=exact reads one shard set"),
    ({"train": "", "sources": [{"name": "a", "train": "TRAIN/shard-000000.tar"}]},
     r"data\.sources\.0\.train: 1 shard\(s\) cannot feed 2 rank\(s\)"),
])
def test_bad_data_settings_name_their_key(asterisk_data: Path, data: dict, message: str) -> None:
    from mmssl.pretrain.recipe import Recipe, RecipeError, _Origin, from_dict
    from mmssl.pretrain.validate import validate_recipe
    from tests.conftest import tiny_recipe_dict

    raw = tiny_recipe_dict(asterisk_data)
    train = str(asterisk_data / "train")
    for source in data.get("sources", []):
        source["train"] = source["train"].replace("TRAIN", train)
    raw["data"].update(data)
    recipe = from_dict(Recipe, raw, path=(), origin=_Origin("test", {}))
    with pytest.raises((RecipeError, DataError), match=message):
        validate_recipe(recipe, world_size=2)

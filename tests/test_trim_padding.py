"""Dynamic padding (``data.trim_padding``): a batch's text is cut to its longest row, rounded up to 8 tokens, on the
host before the copy (micro-batches of one gradient-cache step to one common length); the cut is exact for the text
towers (bidirectional with a padding mask, or causal pooled at the end of text), and the trainer cuts only where
nothing depends on the padded length."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmssl.architectures.modalities import TextConfig, get_modality
from mmssl.data_pipelines.batch import Batch, trim_padding
from mmssl.objectives.base import Requirements
from mmssl.pretrain.transfer import DeviceFeed, trimmed_modalities
from mmssl.tools.recipes_check import placeholder_tokenizer


def _text(lengths: list[int], width: int = 32) -> dict[str, torch.Tensor]:
    mask = torch.stack([torch.arange(width) < n for n in lengths]).long()
    ids = torch.randint(5, 60, (len(lengths), width)) * mask
    return {"input_ids": ids, "attention_mask": mask}


def _batch(lengths: list[int], width: int = 32) -> Batch:
    rows = len(lengths)
    series = {"values": torch.rand(rows, width, 2), "mask": torch.ones(rows, width, dtype=torch.bool)}
    return Batch(inputs={"text": _text(lengths, width), "image": torch.rand(rows, 3, 8, 8), "series": series},
                 present={"text": torch.ones(rows, dtype=torch.bool), "image": torch.ones(rows, dtype=torch.bool),
                          "series": torch.ones(rows, dtype=torch.bool)},
                 keys=[f"k{i}" for i in range(rows)], index=7)


@pytest.mark.parametrize(("lengths", "kept"), [([3, 10, 5], 16), ([8, 2], 8), ([9], 16), ([0, 0], 8),
                                               ([25, 1], 32), ([32, 4], 32)])
def test_cut_to_the_longest_row_rounded_up_to_eight(lengths: list[int], kept: int) -> None:
    batch = _batch(lengths)
    before = {k: v.clone() for k, v in batch.inputs["text"].items()}
    [out] = trim_padding([batch], ["text", "image", "series"])
    text = out.inputs["text"]
    assert text["input_ids"].shape == text["attention_mask"].shape == (len(lengths), kept)
    for key, full in before.items():
        assert torch.equal(text[key], full[:, :kept])  # the first columns, unchanged
        assert not full[:, kept:].any()  # what was cut is padding in every row
        assert torch.equal(batch.inputs["text"][key], full)  # the input batch is not modified
    assert out.inputs["image"] is batch.inputs["image"]
    assert out.inputs["series"] is batch.inputs["series"]  # no attention_mask: not a token input
    assert (out.keys, out.index) == (batch.keys, batch.index)
    if kept == 32:
        assert out is batch


def test_only_the_named_modalities_and_another_multiple() -> None:
    batch = _batch([3, 5])
    assert trim_padding([batch], ["image"]) == [batch]
    assert trim_padding([batch], ["text"], multiple=4)[0].inputs["text"]["input_ids"].shape == (2, 8)
    assert trim_padding([batch], ["text"], multiple=1)[0].inputs["text"]["input_ids"].shape == (2, 5)


def test_batches_cut_together_share_one_length() -> None:
    """Micro-batches of one gradient-cache step: cut to the longest row of any of them."""
    short, long, empty = _batch([3, 2]), _batch([17, 4]), _batch([0, 0])
    cut = trim_padding([short, long, empty], ["text"])
    assert [b.inputs["text"]["input_ids"].shape[1] for b in cut] == [24, 24, 24]
    for before, after in zip((short, long, empty), cut, strict=True):
        assert torch.equal(after.inputs["text"]["input_ids"], before.inputs["text"]["input_ids"][:, :24])


def _tower(tmp_path: Path, arch: str, pool: str) -> tuple[torch.nn.Module, TextConfig]:
    config = TextConfig(arch=arch, pool=pool, width=32, depth=2, heads=2, max_len=32,
                        tokenizer=str(placeholder_tokenizer(tmp_path / "tok.json", 64)))
    torch.manual_seed(0)
    return get_modality("text").build_tower(config).eval(), config


@pytest.mark.parametrize(("arch", "pool"), [("clip", "eot"), ("bert", "cls"), ("bert", "mean")])
def test_the_text_towers_give_the_same_features_on_the_cut_batch(tmp_path: Path, arch: str, pool: str) -> None:
    """CLIP's causal tower pooled at the end of text and BERT-style towers with a padding mask: pooled features and
    the states of real tokens are the same on the cut batch as on the full one (within float rounding)."""
    tower, config = _tower(tmp_path, arch, pool)
    tok = get_modality("text").tokenizer(config)
    texts = ["[CLS] w1 w2 [SEP]", "[CLS] w3 w4 w5 w6 w7 w8 w9 w10 w11 [SEP]", "[CLS] w12 [SEP]"]
    encoded = [tok.encode(t) for t in texts]
    full = {k: torch.stack([e[k] for e in encoded]) for k in encoded[0]}
    batch = Batch(inputs={"text": full}, present={"text": torch.ones(3, dtype=torch.bool)}, keys=["a", "b", "c"])
    cut = trim_padding([batch], ["text"])[0].inputs["text"]
    assert cut["input_ids"].shape[1] == 16 < full["input_ids"].shape[1]
    with torch.no_grad():
        a, b = tower(full), tower(cut)
    torch.testing.assert_close(b.pooled, a.pooled, rtol=1e-5, atol=1e-6)
    real = cut["attention_mask"].bool()
    torch.testing.assert_close(b.features[real], a.features[:, :16][real], rtol=1e-5, atol=1e-6)


def _objective(*masked: str) -> SimpleNamespace:
    return SimpleNamespace(requires=Requirements(modalities=("image", "text"), needs_masked_view=masked))


def test_where_the_trainer_cuts() -> None:
    mods = ("image", "text")
    assert trimmed_modalities(mods, [_objective()], enabled=True) == mods
    # a masked-text objective draws its mask over the padded length: its modality keeps it
    assert trimmed_modalities(mods, [_objective(), _objective("text")], enabled=True) == ("image",)
    assert trimmed_modalities(mods, [_objective()], enabled=False) == ()


def test_the_feed_returns_the_cut_host_batch_and_moves_it() -> None:
    batch = _batch([3, 10])
    feed = DeviceFeed(iter([batch, _batch([30, 2])]), torch.device("cpu"), None, trim=["text", "image"])
    host, moved = next(feed)
    assert host.inputs["text"]["input_ids"].shape == moved.inputs["text"]["input_ids"].shape == (2, 16)
    assert moved.host is host
    next(feed)
    assert feed.positions == {"text": [2 * 16 + 2 * 32, 4 * 32]}  # what the towers ran against what was loaded
    with pytest.raises(StopIteration):
        next(feed)


def test_the_feed_cuts_each_group_to_one_length() -> None:
    """``group=2`` (a gradient-cache step of 2 micro-batches): batches 0-1 to their common length, then 2-3, and a
    last short group at the end of the source; every batch once, in order."""
    lengths = [[3, 2], [12, 4], [5, 5], [2, 1], [20, 1]]
    batches = [replace(_batch(rows), index=i) for i, rows in enumerate(lengths)]
    feed = DeviceFeed(iter(batches), torch.device("cpu"), None, trim=["text"], group=2)
    out = list(feed)
    assert [moved.inputs["text"]["input_ids"].shape[1] for _, moved in out] == [16, 16, 8, 8, 24]
    assert [host.index for host, _ in out] == [moved.index for _, moved in out] == [0, 1, 2, 3, 4]

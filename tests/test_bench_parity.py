"""`mmssl bench parity`: the scores are the ones a user measures, both frameworks train on the shipped recipe's
batches, and the verdict compares against open_clip's seed range."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmssl.tools.bench import parity
from tests.conftest import mmssl


def _held_out(labels: list[int], classes: int) -> parity.HeldOut:
    y = torch.tensor(labels)
    return parity.HeldOut(images=F.one_hot(y, classes).float(), text={"input_ids": y[:, None]}, labels=y,
                          prompts={"input_ids": torch.arange(classes)[:, None]})


def test_scores_count_class_hits_both_ways_and_zero_shot() -> None:
    labels = [0, 0, 1, 1, 1, 2, 3, 3]
    data = _held_out(labels, 4)

    def text(x: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.one_hot(x["input_ids"][:, 0], 4).float()

    exact = parity.scores(lambda x: x, text, data)
    assert exact == {"image_to_text_R@1": 1.0, "text_to_image_R@1": 1.0, "zero_shot_top1": 1.0}

    def confused(x: torch.Tensor) -> torch.Tensor:  # class 1 images look exactly like class 0 ones
        return F.one_hot(torch.where(x.argmax(-1) == 1, 0, x.argmax(-1)), 4).float()

    scored = parity.scores(confused, text, data)
    # image -> text: class-0 images still find their captions first (class-1 captions are elsewhere), class-1 images
    # find class-0 captions: 5 of 8 hit. text -> image: a class-0 caption ties class-1 images with its own (a tie is
    # a miss), a class-1 caption is nearer to no image of its class than to others: only classes 2 and 3 (3 of 8).
    # Zero-shot: class-1 images are predicted class 0.
    assert scored["image_to_text_R@1"] == pytest.approx(5 / 8)
    assert scored["text_to_image_R@1"] == pytest.approx(3 / 8)
    assert scored["zero_shot_top1"] == pytest.approx(5 / 8)


def test_within_spread_reads_open_clips_worst_seed() -> None:
    def summary(loss: tuple[float, float, float], score: tuple[float, float, float]) -> dict:
        one = {"final_loss": dict(zip(("mean", "min", "max"), loss, strict=True))}
        one.update({m: dict(zip(("mean", "min", "max"), score, strict=True)) for m in parity.METRICS[1:]})
        return one

    ref = summary((2.5, 2.4, 2.6), (0.70, 0.65, 0.75))
    assert all(parity.within_spread({"open_clip": ref, "mmssl": summary((2.6, 2.5, 2.7), (0.65, 0.6, 0.7))})
               .values())
    worse = parity.within_spread({"open_clip": ref, "mmssl": summary((2.61, 2.6, 2.62), (0.64, 0.6, 0.7))})
    assert not any(worse.values())


@pytest.mark.distributed
def test_both_frameworks_train_on_the_shipped_recipe(tmp_path: Path) -> None:
    from mmssl.data_pipelines.sources import fashion_mnist

    if not fashion_mnist.ROOT.is_dir():
        pytest.skip("Fashion-MNIST (dataset-fashion-mnist) is not installed")
    out = tmp_path / "parity.json"
    proc = mmssl("bench", "--compare", "open_clip", "--quality", "--steps", "4", "--seeds", "0", "--batch", "8",
                 "--train-images", "64", "--test-images", "30", "--width", "16", "--heads", "2", "--depth", "1",
                 "--embed-dim", "16", "--image-size", "16", "--patch-size", "8", "--loss-window", "2",
                 "--threads", "1", "--workdir", str(tmp_path / "work"), "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["mmssl_recipe"]["base"] == "clip-tiny"  # the shipped defaults, only sizes and stated settings set
    assert set(result["mmssl_recipe"]["model"]["text"]) == {"width", "depth", "heads", "tokenizer", "max_len"}
    for name in ("open_clip", "mmssl"):
        (run,) = result["runs"][name]
        assert run["steps"] == 4 and all(abs(v - 2.079) < 0.6 for v in run["first_losses"][:1])  # ln 8 at start
        assert 0.0 <= run["zero_shot_top1"] <= 1.0
    assert "| open_clip |" in proc.stdout and "| mmssl |" in proc.stdout

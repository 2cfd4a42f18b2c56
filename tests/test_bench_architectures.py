"""The architecture benchmark's rows: measured numbers are positive, parameter counts are consistent (the stitched
model's frozen EfficientNet-Lite0 + MiniLM are counted but not trainable), ratios are against the reference row."""

from __future__ import annotations

import pytest
import torch

from mmssl.architectures.config import build_model
from mmssl.tools.bench.architectures import CASES, REFERENCE, BenchAssets, architecture_rows, step_loss


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return architecture_rows(["late_gated", "stitched_linear"], batch=4, repeat=1)


def test_reference_row_comes_first_with_unit_ratios(rows: list[dict]) -> None:
    assert [r["architecture"] for r in rows] == [REFERENCE, "late_gated", "stitched_linear"]
    assert rows[0]["time_vs_fusion_free"] == 1.0 and rows[0]["memory_vs_fusion_free"] == 1.0
    ref = rows[0]
    for r in rows[1:]:
        assert r["time_vs_fusion_free"] == pytest.approx(r["ms"] / ref["ms"])
        assert r["memory_vs_fusion_free"] == pytest.approx(r["peak_mb"] / ref["peak_mb"])


def test_rows_are_positive_and_parameter_counts_consistent(rows: list[dict]) -> None:
    for r in rows:
        assert r["samples_per_s"] > 0 and r["peak_mb"] > 0
        assert r["samples_per_s"] == pytest.approx(4 / (r["ms"] / 1000))
        assert 0 < r["trainable_parameters"] <= r["parameters"]
    by_name = {r["architecture"]: r for r in rows}
    assert by_name[REFERENCE]["trainable_parameters"] == by_name[REFERENCE]["parameters"]
    stitched = by_name["stitched_linear"]
    assert stitched["trainable_parameters"] < 0.1 * stitched["parameters"]  # the two pretrained models are frozen
    # fusion adds parameters on top of the same two towers and heads
    assert by_name["late_gated"]["parameters"] > by_name[REFERENCE]["parameters"]


def test_step_loss_reaches_every_trainable_parameter(tmp_path) -> None:
    from mmssl.architectures.modalities import get_modality

    cfg = CASES["late_gated"](BenchAssets(tmp_path))
    model = build_model(cfg, seed=0)
    inputs = {m: get_modality(m).random_example(c, 3) for m, c in cfg.towers.items()}
    out = model(inputs)
    loss = step_loss(out)
    expected = sum(e.pow(2).sum() for e in out.embeddings.values()) + out.fused["text"].mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    untouched = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not untouched, untouched[:5]


def test_unknown_architecture_is_named() -> None:
    with pytest.raises(ValueError, match="'late_nope'"):
        architecture_rows(["late_nope"], batch=2, repeat=1)

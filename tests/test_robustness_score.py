"""MultiBench robustness scores (`tools.evaluation.robustness`) against hand-computed values and their defining
properties."""

from __future__ import annotations

import math

import pytest

from mmssl.tools.errors import ToolError
from mmssl.tools.evaluation.robustness import (
    DEFAULT_LEVELS,
    effective_robustness,
    modality_removal_drop,
    relative_robustness,
    robustness_score,
)


def test_relative_robustness_is_the_hand_computed_trapezoid() -> None:
    levels = [0.0, 0.1, 0.3, 0.6, 1.0]
    values = [0.9, 0.8, 0.7, 0.4, 0.2]
    # 0.1·(0.9+0.8)/2 + 0.2·(0.8+0.7)/2 + 0.3·(0.7+0.4)/2 + 0.4·(0.4+0.2)/2 = 0.085 + 0.15 + 0.165 + 0.12
    assert relative_robustness(levels, values) == pytest.approx(0.52)
    assert relative_robustness([0.0, 0.5], [1.0, 0.0]) == pytest.approx(0.5)  # normalised by the level span
    assert relative_robustness([0.2, 0.4, 1.0], [0.7, 0.7, 0.7]) == pytest.approx(0.7)  # a flat curve: its value


def test_relative_robustness_equals_multibench_on_its_grid() -> None:
    values = [0.95, 0.93, 0.9, 0.84, 0.8, 0.71, 0.6, 0.52, 0.43, 0.4, 0.38]
    multibench = sum((values[i] + values[i + 1]) * 0.1 / 2 for i in range(10))  # its helper: step 0.1 on 0..1
    assert relative_robustness(DEFAULT_LEVELS, values) == pytest.approx(multibench)


def test_effective_robustness_on_a_constructed_example() -> None:
    levels = [0.0, 0.5, 1.0]
    model, late_fusion = [0.9, 0.85, 0.8], [0.8, 0.7, 0.6]
    # shifted baseline 0.9, 0.8, 0.7; gap 0, 0.05, 0.1; trapezoid 0.5·0.025 + 0.5·0.075
    assert effective_robustness(levels, model, late_fusion) == pytest.approx(0.05)
    assert effective_robustness(levels, late_fusion, model) == pytest.approx(-0.05)
    assert effective_robustness(levels, model, model) == pytest.approx(0.0)
    shifted = [v + 0.13 for v in late_fusion]  # only the reference's drop matters, not its clean value
    assert effective_robustness(levels, model, shifted) == pytest.approx(0.05)
    # per-model form: against a perfectly robust reference, minus the mean drop from clean
    drop = (0.5 * (0.0 + 0.05) / 2 + 0.5 * (0.05 + 0.1) / 2)
    assert effective_robustness(levels, model) == pytest.approx(-drop)
    assert effective_robustness(levels, model, 1.0) == pytest.approx(relative_robustness(levels, model) - 1.0)
    assert effective_robustness(levels, [0.6, 0.6, 0.6]) == 0.0


def test_robustness_score_per_model_and_against_a_reference() -> None:
    levels = [0.0, 0.5, 1.0]
    curves = {
        "late_fusion": {"image/blur": [0.8, 0.7, 0.6], "text/typos": [0.8, 0.5, 0.2]},
        "ours": {"image/blur": [0.9, 0.85, 0.8], "text/typos": [0.9, 0.8, 0.7]},
    }
    scores = robustness_score(curves, levels, reference="late_fusion")
    ours = scores["ours"]
    assert ours["relative"] == pytest.approx({"image/blur": 0.85, "text/typos": 0.8})
    assert ours["score"] == pytest.approx((0.85 + 0.8) / 2)
    # text: shifted baseline 0.9, 0.6, 0.3; gap 0, 0.2, 0.4 -> 0.2
    assert ours["effective"] == pytest.approx({"image/blur": 0.05, "text/typos": 0.2})
    assert ours["effective_mean"] == pytest.approx(0.125)
    assert ours["clean"] == {"image/blur": 0.9, "text/typos": 0.9}
    assert scores["late_fusion"]["effective"] == pytest.approx({"image/blur": 0.0, "text/typos": 0.0})
    alone = robustness_score({"ours": curves["ours"]}, levels)["ours"]
    assert alone["effective"]["text/typos"] == pytest.approx(0.8 - 0.9)
    assert robustness_score({"m": {"a/b": [0.5] * 11}})["m"]["score"] == pytest.approx(0.5)  # default grid


def test_modality_removal_drop() -> None:
    out = modality_removal_drop(0.8, {"audio": 0.6, "text": 0.8, "video": 0.9})
    assert out["audio"] == pytest.approx({"value": 0.6, "drop": 0.2, "relative_drop": 0.25})
    assert out["text"]["drop"] == pytest.approx(0.0)
    assert out["video"]["drop"] == pytest.approx(-0.1)  # removing a noisy modality can help
    assert math.isnan(modality_removal_drop(0.0, {"audio": 0.0})["audio"]["relative_drop"])


@pytest.mark.parametrize(("levels", "values", "match"), [
    ([0.0], [1.0], "at least 2 levels"),
    ([0.0, 0.5, 1.0], [1.0, 0.5], "2 metric values for 3 levels"),
    ([0.0, 0.5, 0.5], [1.0, 0.5, 0.2], r"increase strictly within \[0, 1\], got \[0.0, 0.5, 0.5\]"),
    ([0.0, 1.5], [1.0, 0.5], r"got \[0.0, 1.5\]"),
    ([0.0, 1.0], [1.0, math.nan], "finite, got nan"),
])
def test_bad_curves_are_reported(levels: list[float], values: list[float], match: str) -> None:
    with pytest.raises(ToolError, match=match):
        relative_robustness(levels, values, where="image/blur")


def test_bad_score_inputs_are_reported() -> None:
    with pytest.raises(ToolError, match=r"'ours' curve 'image/blur'.*finite"):
        robustness_score({"ours": {"image/blur": [1.0, math.inf]}}, [0.0, 1.0])
    with pytest.raises(ToolError, match="reference model 'lf' has no curve 'text/typos'"):
        robustness_score({"lf": {"image/blur": [1, 1]}, "ours": {"text/typos": [1, 1]}}, [0, 1], reference="lf")
    with pytest.raises(ToolError, match="'nope' has no curves"):
        robustness_score({"ours": {"image/blur": [1, 1]}}, [0, 1], reference="nope")
    with pytest.raises(ToolError, match="without 'audio' must be finite"):
        modality_removal_drop(0.8, {"audio": math.nan})
    with pytest.raises(ToolError, match="reference curve"):
        effective_robustness([0, 1], [1, 0.5], [1.0, 0.5, 0.2])

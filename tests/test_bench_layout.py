"""`mmssl bench layout` at its smallest: the tower rows' ratios follow from their timings, the training-step rows
come from the trainer with ``train.channels_last`` off and at its default (which switches the ResNet audio tower),
and bad options fail in one line naming the option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import mmssl, mmssl_in_process, tiny_recipe_dict, write_recipe


def test_layout_rows_follow_from_the_runs(asterisk_data: Path, tmp_path: Path) -> None:
    audio = {"arch": "resnet10t", "model_args": {"channels": [8, 16, 32, 64]}, "frames": 64, "n_mels": 32,
             "hop_length": 160, "norm_mean": -10.0, "norm_std": 5.0}
    recipe = write_recipe(tmp_path / "resnet.yaml", tiny_recipe_dict(
        asterisk_data, model={**tiny_recipe_dict(asterisk_data)["model"], "audio": audio}))
    out = tmp_path / "layout.json"
    done = mmssl("bench", "layout", "--only", "resnet10t", "--trials", "2", "--repeat", "1", "--precisions", "fp32",
                 "--recipe", str(recipe), "--steps", "1", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    [row] = result["towers"]
    assert row["tower"].startswith("resnet10t") and len(row["trials"]["nhwc"]) == 1
    assert row["speedup"] == pytest.approx(row["nchw_ms"] / row["nhwc_ms"])
    assert row["nchw_ms"] == pytest.approx(1000 * row["trials"]["nchw"][0])
    step = result["step"]
    assert step["channels_last_towers"] == ["towers.audio"] and set(step["samples_per_s"]) == {"nchw", "auto"}
    assert "| auto (default) | towers.audio |" in done.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--trials", "1"], "--trials must be >= 2"),
    (["--only", "resnet9000"], "--only ['resnet9000']: not among the towers"),
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--recipe", "nosuch"], "recipe not found: 'nosuch'"),
])
def test_bad_layout_options_name_the_option(args: list[str], message: str) -> None:
    done = mmssl_in_process("bench", "layout", *args)
    assert done.returncode != 0 and message in done.stderr, done.stderr

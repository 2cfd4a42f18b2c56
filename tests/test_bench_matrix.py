"""`mmssl bench matrix` and `mmssl bench flip`, at the smallest sizes: the rows are real runs, and their derived
columns follow from the measured ones (MFU formula, DeepSpeed's collectives inside backward + optimizer, AdamW state
per rank = 8 bytes x trainable at ZeRO-0, FLIP's token counts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmssl.tools.bench.matrix import parse_args
from mmssl.tools.errors import ToolError
from tests.conftest import mmssl, mmssl_in_process


@pytest.mark.distributed
def test_matrix_row_columns_follow_from_the_run(tmp_path: Path) -> None:
    out = tmp_path / "matrix.json"
    done = mmssl("bench", "matrix", "--only", "unified", "--stages", "0", "--steps", "3", "--batch", "8",
                 "--width", "32", "--depth", "1", "--limit", "128", "--peak-size", "256",
                 "--workdir", str(tmp_path / "w"), "--json", str(out), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert (row["family"], row["zero_stage"], row["ranks"], row["global_batch"]) == ("unified", 0, 2, 16)
    peak = result["matmul_peak_flops_per_rank"]["2"]
    assert row["mfu"] == pytest.approx(row["gflop_per_sample"] * 1e9 * row["samples_per_s"] / (2 * peak))
    assert 0 < row["comm_ms"] <= row["backward_ms"] + row["optimizer_ms"]  # the gradient all-reduce happens there
    state = 8 * row["trainable_parameters"] / 2**20  # AdamW's two fp32 moments, whole on each rank at ZeRO-0
    assert max(row["optimizer_state_mb_per_rank"]) == pytest.approx(state, rel=0.02)
    assert "| unified | contrastive | 0 | 2 | 16 |" in done.stdout
    hardware = result["hardware"]  # the machine the figures depend on, in the JSON and above the table
    assert f"kernels {hardware['cpu_capability']}, torch {hardware['torch']}" in done.stdout


def test_flip_rows_report_the_kept_tokens(tmp_path: Path) -> None:
    out = tmp_path / "flip.json"
    done = mmssl("bench", "flip", "--rates", "0", "0.5", "--steps", "1", "--trials", "2", "--batch", "8",
                 "--limit", "32", "--workdir", str(tmp_path / "w"), "--json", str(out), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows, r0 = result["rows"], result["rate0"]
    assert [r["image_tokens"] for r in rows] == [1 + 64, 1 + 32]  # 64 px / patch 8: 64 patches + [CLS]
    assert rows[0]["step_speedup"] == 1.0 and rows[0]["image_tower_speedup"] == 1.0
    assert rows[1]["step_speedup"] == pytest.approx(rows[1]["samples_per_s"] / rows[0]["samples_per_s"])
    assert r0["step_ms"] == pytest.approx(1000 * 8 / rows[0]["samples_per_s"])
    assert rows[0]["ceiling"] == pytest.approx(1.0)  # Amdahl: t / (t - I (1 - kept)), kept = 33 / 65 at 50 %
    saved = r0["image_tower_ms"] * (1 - 33 / 65)
    assert rows[1]["ceiling"] == pytest.approx(r0["step_ms"] / (r0["step_ms"] - saved))


def test_bad_bench_options_name_the_option() -> None:
    with pytest.raises(ToolError, match="--only 'fusionfree': not a family"):
        parse_args(["matrix", "--only", "fusionfree"])
    with pytest.raises(ToolError, match="--steps must be >= 2"):
        parse_args(["matrix", "--steps", "1"])
    with pytest.raises(ToolError, match=r"--stages 4: not a ZeRO stage \(choose from 0, 1, 2, 3\)"):
        parse_args(["matrix", "--stages", "2", "4"])
    done = mmssl_in_process("bench", "flip", "--rates", "1.0")
    assert done.returncode == 2 and "--rates must be in [0, 1)" in done.stderr
    done = mmssl_in_process("bench", "flip", "--image-size", "60")
    assert done.returncode == 2 and "--image-size 60 is not a multiple of --patch-size 8" in done.stderr

"""Bad input through the `mmssl` command: one clear line naming the value, exit code 2, no traceback. The CLI runs
in this process (`mmssl_in_process`: its ``main``), except two cases through the console script itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmssl.architectures.config import ModelConfig, build_model
from mmssl.architectures.encoder import save_encoder
from mmssl.architectures.modalities import AudioConfig
from tests.conftest import mmssl, mmssl_in_process, tiny_recipe_dict, write_recipe


def _one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mmssl: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture
def recipe(tmp_path: Path, asterisk_data: Path) -> Path:
    return write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(asterisk_data))


def test_missing_shard_path(recipe: Path, tmp_path: Path) -> None:
    proc = mmssl_in_process("pretrain", str(recipe), f"data.train={tmp_path}/gone", "--run-dir", str(tmp_path / "run"))
    _one_line_error(proc, "data.train", f"{tmp_path}/gone")


def test_unknown_recipe_key(recipe: Path, tmp_path: Path) -> None:
    proc = mmssl("pretrain", str(recipe), "--run-dir", str(tmp_path / "run"), "train.warmpu_steps=3")
    _one_line_error(proc, "unknown key 'train.warmpu_steps'", "warmup_steps")


def test_modality_the_model_lacks(recipe: Path, tmp_path: Path) -> None:
    proc = mmssl_in_process("pretrain", str(recipe), "objectives.contrastive.pairs=[[audio,video]]", "--run-dir",
                            str(tmp_path / "run"))
    _one_line_error(proc, "objectives.contrastive", "'video'")


def test_non_numeric_override(recipe: Path, tmp_path: Path) -> None:
    proc = mmssl_in_process("pretrain", str(recipe), "train.steps=ten", "--run-dir", str(tmp_path / "run"))
    _one_line_error(proc, "'train.steps' expects int, got 'ten'")


def test_export_of_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    proc = mmssl_in_process("export", str(tmp_path), "--out", str(tmp_path / "x"))
    _one_line_error(proc, f"{tmp_path} is not a run directory")


def test_probe_skips_and_counts_a_truncated_shard(asterisk_data: Path, tmp_path: Path) -> None:
    cfg = ModelConfig(embed_dim=8, towers={"audio": AudioConfig(width=16, depth=1, heads=2, frames=32, n_mels=32)})
    model = build_model(cfg, seed=0)
    enc = tmp_path / "audio"
    save_encoder(enc, "audio", cfg.towers["audio"], model.towers["audio"], model.heads["audio"], 8)
    train = tmp_path / "train"
    shutil.copytree(asterisk_data / "train", train)
    victim = sorted(train.glob("shard-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    # the console script itself: the skipped shard's warning is a log line on its stderr
    proc = mmssl("probe", str(enc), "--shards", str(train), "--test-shards", str(asterisk_data / "test"),
                 "--label", "family", "--no-floor", "--json", str(tmp_path / "probe.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping the rest of shard {victim}" in proc.stderr
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["pretrained"]["data_errors"] == {"tar_errors": 1}


def test_probe_with_an_unknown_label_field(asterisk_data: Path, tmp_path: Path) -> None:
    cfg = ModelConfig(embed_dim=8, towers={"audio": AudioConfig(width=16, depth=1, heads=2, frames=32, n_mels=32)})
    model = build_model(cfg, seed=0)
    save_encoder(tmp_path / "audio", "audio", cfg.towers["audio"], model.towers["audio"], model.heads["audio"], 8)
    proc = mmssl_in_process("probe", str(tmp_path / "audio"), "--shards", str(asterisk_data / "train"), "--test-shards",
                            str(asterisk_data / "test"), "--label", "colour", "--no-floor")
    _one_line_error(proc, "label field 'colour'", "family")


def test_probe_out_writes_results_and_plot(asterisk_data: Path, tmp_path: Path) -> None:
    cfg = ModelConfig(embed_dim=8, towers={"audio": AudioConfig(width=16, depth=1, heads=2, frames=32, n_mels=32)})
    model = build_model(cfg, seed=0)
    save_encoder(tmp_path / "audio", "audio", cfg.towers["audio"], model.towers["audio"], model.heads["audio"], 8)
    proc = mmssl_in_process("probe", str(tmp_path / "audio"), "--shards", str(asterisk_data / "train"), "--test-shards",
                            str(asterisk_data / "test"), "--label", "family", "--json", str(tmp_path / "probe.json"),
                            "--out", str(tmp_path / "eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == json.loads(
        (tmp_path / "probe.json").read_text())
    assert (tmp_path / "eval" / "probe_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

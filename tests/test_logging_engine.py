"""Logging sinks and DeepSpeed settings from a recipe: ``train.report_to`` (metrics.jsonl always, TensorBoard, W&B in
offline mode, no network) and ``train.deepspeed`` merged over the generated DeepSpeed config (conflicts refused
before launch, passthrough keys reaching the real engine)."""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mmssl.pretrain.engine import build_engine, check_deepspeed_passthrough, deepspeed_config
from mmssl.pretrain.recipe import RecipeError, TrainConfig, WandbConfig
from mmssl.pretrain.runlog import check_reporting, metric_sinks
from tests.conftest import mmssl_in_process
from tests.helpers.spawn import spawn_ranks
from tests.helpers.train_many import Job, run_jobs

OFFLOAD = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": 4096},
           "zero_force_ds_cpu_optimizer": False, "steps_per_print": 1000, "wall_clock_breakdown": True}


def _pretrain(fashion: tuple[Path, Path], run: Path, *overrides: str):
    train, spm = fashion
    return mmssl_in_process("pretrain", "clip-tiny", f"data.train={train}", f"model.text.tokenizer={spm}",
                            "--run-dir", str(run), *overrides)


def test_report_to_chooses_the_sinks_and_the_old_tensorboard_switch_still_works() -> None:
    assert metric_sinks(TrainConfig()) == ("jsonl", "tensorboard")
    assert metric_sinks(TrainConfig(tensorboard=False)) == ("jsonl",)
    assert metric_sinks(TrainConfig(report_to=["wandb"])) == ("jsonl", "wandb")  # metrics.jsonl is always written
    assert metric_sinks(TrainConfig(report_to=["wandb", "jsonl", "tensorboard"])) == ("jsonl", "tensorboard", "wandb")
    check_reporting(TrainConfig(report_to=["tensorboard"], tensorboard=True))  # agreeing keys are fine
    with pytest.raises(RecipeError, match=r"^train\.report_to: unknown sink 'mlflow'; choose among jsonl, "
                                          r"tensorboard, wandb$"):
        check_reporting(TrainConfig(report_to=["mlflow"]))
    with pytest.raises(RecipeError, match=r"^train\.tensorboard=true disagrees with train\.report_to=\['wandb'\]"):
        check_reporting(TrainConfig(report_to=["wandb"], tensorboard=True))
    with pytest.raises(RecipeError, match=r"^train\.wandb\.mode must be one of online, offline, disabled"):
        check_reporting(TrainConfig(report_to=["wandb"], wandb=WandbConfig(mode="sometimes")))


def test_a_missing_wandb_package_is_one_line_naming_the_extra_before_launch(
        fashion: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets when the package is not installed
    done = _pretrain(fashion, tmp_path / "run", "train.report_to=[wandb]")
    assert done.returncode == 2 and not (tmp_path / "run").exists()
    assert done.stderr == ("mmssl: error: train.report_to includes wandb, but the wandb package is not installed; "
                           "install it with pip install 'mmssl[wandb]' (or pip install wandb)\n")


def test_deepspeed_passthrough_merges_key_by_key_over_the_generated_config() -> None:
    train = TrainConfig(grad_accum=2, deepspeed=OFFLOAD)
    plain = deepspeed_config(TrainConfig(grad_accum=2), 8, 2, trainable=10**6)
    merged = deepspeed_config(train, 8, 2, trainable=10**6)
    assert merged["zero_optimization"] == {**plain["zero_optimization"], "offload_optimizer": {"device": "cpu"},
                                           "reduce_bucket_size": 4096}  # the generated ZeRO keys stay
    assert merged["steps_per_print"] == 1000 and merged["wall_clock_breakdown"] is True
    assert {k: v for k, v in merged.items() if k not in OFFLOAD} == \
        {k: v for k, v in plain.items() if k not in OFFLOAD}
    same = TrainConfig(deepspeed={"gradient_clipping": 1, "bf16": {"enabled": False}, "train_batch_size": 16,
                                  "zero_optimization": {"stage": 2}})
    assert deepspeed_config(same, 8, 2, trainable=10**6)["train_batch_size"] == 16  # mmssl's own values may repeat
    check_deepspeed_passthrough(train, 8, 2)


@pytest.mark.parametrize(("passthrough", "message"), [
    ({"gradient_clipping": 0.5}, "train.deepspeed.gradient_clipping=0.5 conflicts with the DeepSpeed config mmssl "
                                 "generates: mmssl sets it to 1.0 from train.grad_clip"),
    ({"zero_optimization": {"stage": 3}}, "train.deepspeed.zero_optimization.stage=3 conflicts with the DeepSpeed "
                                          "config mmssl generates: mmssl sets it to 2 from train.zero_stage"),
    ({"train_micro_batch_size_per_gpu": 4}, "mmssl sets it to 8 from data.batch_size"),
    ({"train_batch_size": 64}, "mmssl sets it to 16 from data.batch_size x ranks x train.grad_accum"),
    ({"bf16": {"enabled": True}}, "train.deepspeed.bf16.enabled=True conflicts with the DeepSpeed config mmssl "
                                  "generates: mmssl sets it to False from train.precision"),
    ({"optimizer": {"type": "Adam"}}, "train.deepspeed.optimizer.type='Adam' conflicts with the DeepSpeed config "
                                      "mmssl generates: mmssl leaves it unset; it follows train.lr"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
     "train.deepspeed.zero_optimization.offload_optimizer.device='cpu' offloads mmssl's torch AdamW, which DeepSpeed "
     "refuses unless train.deepspeed.zero_force_ds_cpu_optimizer is false"),
    ({"zero_optimization": {"offload_optimzer": {"device": "cpu"}}},
     "train.deepspeed: DeepSpeed rejects the merged config: zero_optimization.offload_optimzer: Extra inputs are not "
     "permitted"),
])
def test_a_conflicting_or_invalid_deepspeed_key_is_a_one_line_error(passthrough: dict, message: str) -> None:
    with pytest.raises(RecipeError) as caught:
        check_deepspeed_passthrough(TrainConfig(deepspeed=passthrough), 8, 2)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_pretrain_refuses_a_conflicting_deepspeed_key_before_launch(fashion: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    done = _pretrain(fashion, tmp_path / "run", "train.deepspeed.gradient_accumulation_steps=4")
    assert done.returncode == 2 and not (tmp_path / "run").exists()
    assert done.stderr == ("mmssl: error: train.deepspeed.gradient_accumulation_steps=4 conflicts with the DeepSpeed "
                           "config mmssl generates: mmssl sets it to 1 from train.grad_accum; change that instead (or "
                           "drop train.deepspeed.gradient_accumulation_steps)\n")


def _engine_with_passthrough(rank: int, world: int) -> dict[str, Any]:
    """Build the engine of a tiny task with `OFFLOAD` passed through and take two steps on it."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # what a launcher sets
    torch.manual_seed(0)
    task = nn.Linear(4, 3)
    cfg = TrainConfig(steps=2, lr=0.1, warmup_steps=0, zero_stage=2, deepspeed=OFFLOAD)
    engine, _, _ = build_engine(task, cfg, 2, world)
    before = engine.module.weight.detach().clone()
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        loss = nn.functional.cross_entropy(engine(torch.randn(2, 4, generator=g)), torch.tensor([0, 2]))
        engine.backward(loss)
        engine.step()
    zero = engine._config.zero_config
    return {"offload": str(getattr(zero.offload_optimizer.device, "value", zero.offload_optimizer.device)),
            "bucket": zero.reduce_bucket_size, "stage": engine.zero_optimization_stage(),
            "steps_per_print": engine.steps_per_print(), "breakdown": engine.wall_clock_breakdown(),
            "clip": engine.gradient_clipping(), "global_batch": engine.train_batch_size(),
            "moved": float((engine.module.weight.detach() - before).abs().max()),
            "weight": engine.module.weight.detach().clone()}


@pytest.mark.distributed
def test_deepspeed_passthrough_keys_reach_the_engine() -> None:
    ranks = spawn_ranks(_engine_with_passthrough, world=2)
    for r in ranks:
        assert {k: r[k] for k in ("offload", "bucket", "stage", "steps_per_print", "breakdown", "clip",
                                  "global_batch")} == {"offload": "cpu", "bucket": 4096, "stage": 2,
                                                       "steps_per_print": 1000, "breakdown": True, "clip": 1.0,
                                                       "global_batch": 4}
        assert r["moved"] > 0  # the offloaded optimizer stepped
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])


# ------------------------------------------------------------------------------------------------ W&B offline
WANDB_BLOCK = 32768  # W&B's transaction log: LevelDB's log format (32 KiB blocks of CRC32-checked chunks)


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then chunks
    ``(crc32, length, type)`` + data in 32 KiB blocks (type 1: a whole record, 2-4: its first, middle, last part)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        room = WANDB_BLOCK - pos % WANDB_BLOCK
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"corrupt chunk at byte {pos} of {path}"
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.distributed
def test_wandb_offline_run_writes_its_history_under_the_run_directory(
        fashion: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing outside the test's folder
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train, spm = fashion
    run = tmp_path / "run"
    overrides = [f"data.train={train}", f"model.text.tokenizer={spm}", "data.num_workers=0", "data.batch_size=8",
                 "train.steps=3", "train.log_every=1", "train.ckpt_every=0", "train.report_to=[jsonl,wandb]",
                 "train.wandb.mode=offline", "train.wandb.tags=[test]",
                 *(f"train.deepspeed.{k}={json.dumps(v)}" for k, v in OFFLOAD.items())]
    assert run_jobs([Job("clip-tiny", overrides, str(run))], nproc=2) == {str(run): None}
    (folder,) = (run / "wandb").glob("offline-run-*")  # rank 0 only: one W&B run
    run_id = (run / "wandb" / "mmssl-run-id").read_text().strip()
    assert folder.name.endswith(f"-{run_id}") and (folder / "logs" / "debug.log").is_file()
    assert not (run / "tensorboard").exists()  # not asked for
    records = wandb_records(folder / f"run-{run_id}.wandb")
    history = {r.history.step.num: {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history) == [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:  # every number of metrics.jsonl, as W&B recorded it (NaN: the first step's rate)
        logged = history[m["step"]]
        assert "loss" in m and all(logged[k] == v or (v != v and logged[k] != logged[k])
                                   for k, v in m.items() if k != "step"), (m, logged)
    (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in info.config.update}
    assert info.run_id == run_id and info.display_name == "run" and list(info.tags) == ["test"]
    assert config["name"] == "clip-tiny" and config["train"]["deepspeed"] == OFFLOAD  # the resolved recipe
    assert re.fullmatch(r"[a-z0-9]{8}", run_id)

"""`mmssl finetune` on real DeepSpeed ranks: layer-wise LR decay, freezing, 1 vs 2 ranks, early stopping, errors."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmssl.architectures.encoder import Encoder, save_encoder
from mmssl.architectures.heads import ProjectionHead
from mmssl.architectures.modalities import AudioConfig, get_modality
from mmssl.tools.errors import ToolError
from mmssl.tools.finetune.command import format_finetune, launch_finetune
from mmssl.tools.finetune.config import FinetuneConfig
from mmssl.tools.finetune.data import EvalCache, epoch_order, eval_rows, load_splits, rank_rows
from mmssl.tools.finetune.model import Classifier, apply_freeze, finetune_param_groups, load_classifier
from mmssl.tools.finetune.rank import top1
from tests.conftest import run_ranks

pytestmark = pytest.mark.distributed

DEPTH = 2
TINY = {"width": 48, "depth": DEPTH, "heads": 2, "frames": 64, "n_mels": 32, "patch_size": [16, 16],
        "hop_length": 160, "pool": "avg", "norm_mean": -10.0, "norm_std": 5.0}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny audio ViT written in the `mmssl export` format."""
    torch.manual_seed(0)
    cfg = AudioConfig(**TINY)
    tower = get_modality("audio").build_tower(cfg)
    return save_encoder(tmp_path_factory.mktemp("encoder") / "audio", "audio", cfg, tower,
                        ProjectionHead(tower.num_features, 32), 32)


def _config(encoder: Path, data: Path, out: Path, **overrides: object) -> FinetuneConfig:
    values: dict[str, object] = {
        "encoder_dir": str(encoder), "shards": str(data / "train"), "test_shards": str(data / "test"),
        "label": "family", "out_dir": str(out), "epochs": 1, "batch_size": 16, "lr": 2e-3, "warmup_steps": 1,
        "layer_decay": 0.75, "zero_stage": 2, "seed": 0, "threads": 1,
    }
    return FinetuneConfig(**{**values, **overrides})  # type: ignore[arg-type]


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _expected_layer(name: str) -> int:
    """The BEiT layer id written out by hand for timm's ViT: stem 0, block i -> i + 1, final norm with the last
    block, head on top."""
    if re.match(r"tower\.model\.(cls_token|pos_embed|patch_embed\.)", name):
        return 0
    block = re.match(r"tower\.model\.blocks\.(\d+)\.", name)
    if block:
        return int(block.group(1)) + 1
    if re.match(r"tower\.model\.(fc_norm|norm)\.", name):
        return DEPTH
    assert name.startswith("head."), name
    return DEPTH + 1


def test_layer_decay_lrs_follow_the_formula(encoder_dir: Path) -> None:
    model = Classifier(Encoder.from_dir(encoder_dir).tower, 5)
    lr, decay = 3e-3, 0.6
    seen: dict[int, tuple[float, float]] = {}
    for group in finetune_param_groups(model, lr, 0.05, decay):
        for p in group["params"]:
            assert id(p) not in seen
            seen[id(p)] = (group["lr"], group["weight_decay"])
    names = dict(model.named_parameters())
    assert len(seen) == len(names)
    for name, p in names.items():
        group_lr, wd = seen[id(p)]
        assert group_lr == pytest.approx(lr * decay ** (DEPTH + 1 - _expected_layer(name)), rel=1e-12), name
        no_decay = p.ndim <= 1 or name in ("tower.model.cls_token", "tower.model.pos_embed")
        assert wd == (0.0 if no_decay else 0.05), name
    plain = finetune_param_groups(model, lr, 0.05, None)  # without layer decay: every parameter at lr
    assert {g["lr"] for g in plain} == {lr} and sum(len(g["params"]) for g in plain) == len(names)


def test_freeze_k_trains_only_the_last_k_groups_and_the_head(encoder_dir: Path) -> None:
    for k, expected in ((0, {DEPTH + 1}), (1, {DEPTH, DEPTH + 1}), (DEPTH + 1, set(range(DEPTH + 2)))):
        model = Classifier(Encoder.from_dir(encoder_dir).tower, 5)
        count = apply_freeze(model, k)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {n for n, _ in model.named_parameters() if _expected_layer(n) in expected}, k
        assert count == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    model = Classifier(Encoder.from_dir(encoder_dir).tower, 5)
    apply_freeze(model, "encoder")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


def test_every_rank_does_the_same_steps_and_every_sample_is_seen() -> None:
    n, batch, world = 37, 4, 3
    order = epoch_order(n, batch * world, epoch=2, seed=5)
    assert len(order) == math.ceil(n / (batch * world)) * batch * world and set(order.tolist()) == set(range(n))
    steps = len(order) // (batch * world)
    rows = [torch.cat([rank_rows(order, s, batch, r, world) for s in range(steps)]) for r in range(world)]
    assert all(len(r) == steps * batch for r in rows)
    assert torch.equal(torch.cat([torch.stack([r.view(steps, batch)[s] for r in rows]).flatten()
                                  for s in range(steps)]), order)
    one_rank = [rank_rows(epoch_order(n, batch * world, 2, 5), s, batch * world, 0, 1) for s in range(steps)]
    assert torch.equal(torch.cat(one_rank), order)  # 1 rank x 12 == 3 ranks x 4, batch by batch
    shares = [list(eval_rows(n, 5, r, world)) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # equal forward counts (ZeRO-3 safe)
    real = sorted(i for s in shares for idx, mask in s for i in idx[mask].tolist())
    assert real == list(range(n))


@pytest.fixture(scope="module")
def equal_runs(encoder_dir: Path, asterisk_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """One epoch of full fine-tuning (layer decay 0.75, ZeRO-2, fp32): 1 rank x 16 and 2 ranks x 8."""
    tmp = tmp_path_factory.mktemp("equal")
    runs = {}
    for nproc, batch in ((1, 16), (2, 8)):
        out = tmp / f"ranks{nproc}"
        assert launch_finetune(_config(encoder_dir, asterisk_data, out, batch_size=batch), nproc) == 0
        runs[nproc] = out
    return runs


def test_two_ranks_equal_one_rank_on_the_same_global_batches(equal_runs: dict[int, Path], encoder_dir: Path) -> None:
    one, two = (load_file(str(equal_runs[n] / "model.safetensors")) for n in (1, 2))
    assert one.keys() == two.keys()
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst <= 1e-6, f"1-rank and 2-rank weights differ by {worst}"
    initial = load_file(str(encoder_dir / "model.safetensors"))
    moved = max(float((one[f"tower.model.{k}"] - v).abs().max()) for k, v in initial.items())
    assert moved > 1e-4  # the tower really trained, so the comparison is not vacuous
    r1, r2 = (json.loads((equal_runs[n] / "results.json").read_text()) for n in (1, 2))
    assert r1["global_batch"] == r2["global_batch"] == 16 and r1["steps_per_epoch"] == r2["steps_per_epoch"]
    assert r1["epochs"][0]["train_loss"] == pytest.approx(r2["epochs"][0]["train_loss"], abs=1e-5)
    steps = r1["steps_per_epoch"]  # the head's LR at the last step: warmup 1, cosine to 0 over `steps`
    assert r1["epochs"][0]["lr"] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * (steps - 2) / (steps - 1))))


@pytest.fixture(scope="module")
def frozen_run(encoder_dir: Path, asterisk_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Head-only training (ZeRO-3, 1 rank) with early stopping."""
    out = tmp_path_factory.mktemp("frozen") / "run"
    cfg = _config(encoder_dir, asterisk_data, out, freeze="encoder", epochs=12, patience=2, lr=0.05,
                  zero_stage=3, layer_decay=None, warmup_steps=0)
    assert launch_finetune(cfg, 1) == 0
    return out


def test_frozen_encoder_stays_bit_identical_and_the_head_trains(frozen_run: Path, encoder_dir: Path) -> None:
    initial = load_file(str(encoder_dir / "model.safetensors"))
    tuned = load_file(str(frozen_run / "model.safetensors"))
    exported = load_file(str(frozen_run / "encoder" / "model.safetensors"))
    assert {k for k in tuned if k.startswith("tower.")} == {f"tower.model.{k}" for k in initial}
    for k, v in initial.items():
        assert _sha256(tuned[f"tower.model.{k}"]) == _sha256(v), k
        assert _sha256(exported[k]) == _sha256(v), k
    results = json.loads((frozen_run / "results.json").read_text())
    classes = len(results["classes"])
    assert results["trainable_parameters"] == 48 * classes + classes
    assert float(tuned["head.weight"].abs().max()) > 1e-2  # far from its N(0, 2e-5²) init


def test_early_stopping_keeps_the_best_weights(frozen_run: Path, encoder_dir: Path) -> None:
    results = json.loads((frozen_run / "results.json").read_text())
    vals = [e["val_top1"] for e in results["epochs"]]
    best = results["best_epoch"]
    assert results["stopped_early"] and len(vals) == best + 2 < 12
    assert vals[best - 1] == max(vals) == results["best_val_top1"] and max(vals[:best - 1], default=-1) < max(vals)
    model, info = load_classifier(frozen_run)
    cfg = FinetuneConfig(**results["config"])
    encoder = Encoder.from_dir(encoder_dir)
    splits = load_splits(cfg, encoder)
    assert info["classes"] == splits.classes == results["classes"]
    kwargs = {"batch_size": 7, "rank": 0, "world": 1, "device": torch.device("cpu"), "dtype": None}
    val = top1(model, EvalCache(splits.val, "audio", encoder.decoder(), 0), splits.targets(splits.val), **kwargs)
    assert val == results["best_val_top1"]
    test = top1(model, EvalCache(splits.test, "audio", encoder.decoder(), 0), splits.targets(splits.test), **kwargs)
    assert test == results["test_top1"]
    assert (frozen_run / "finetune_curve.png").stat().st_size > 1000
    table = format_finetune(results)
    assert len([ln for ln in table.splitlines() if ln.strip().endswith("*")]) == 1
    assert f"best epoch {best}" in table and "stopped early" in table


def test_bad_inputs_are_named(encoder_dir: Path, asterisk_data: Path, tmp_path: Path) -> None:
    cases = [
        ({"label": "speaker_id"}, r"'speaker_id'.*fields: \[.*'family'"),
        ({"label": "split"}, r"at least 2 classes, got \['train'\]"),
        ({"freeze": 4}, rf"--freeze=4 exceeds the {DEPTH + 1} layer groups"),
        ({"encoder_dir": str(asterisk_data)}, r"ENCODER_DIR .*config.json is missing"),
        ({"freeze": "half"}, r"--freeze must be 'none', 'encoder' or .* got 'half'"),
    ]
    for overrides, message in cases:
        with pytest.raises(ToolError, match=message):
            launch_finetune(_config(encoder_dir, asterisk_data, tmp_path / "bad", **overrides), 1)
    assert not (tmp_path / "bad").exists()  # nothing launched, nothing written


def test_bf16_zero3_under_an_external_launcher_keeps_frozen_groups_exact(encoder_dir: Path, asterisk_data: Path,
                                                                        tmp_path: Path) -> None:
    """torchrun starts `python -m mmssl.tools.finetune.command` as each of 2 ranks: ZeRO-3, bf16, only the last layer
    group and the head train; the frozen groups come back bit-identical in fp32 (not rounded through bf16)."""
    out = tmp_path / "run"
    proc = run_ranks(2, ["-m", "mmssl.tools.finetune.command", str(encoder_dir), "--shards",
                         str(asterisk_data / "train"),
                         "--label", "family", "--out", str(out), "--epochs", "1", "--batch-size", "8",
                         "--zero-stage", "3", "--precision", "bf16", "--freeze", "1", "--layer-decay", "0.75",
                         "--lr", "1e-2", "--threads", "1"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "best epoch 1" in proc.stdout  # rank 0 printed the table
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["config"]["precision"] == "bf16" and results["test_top1"] is None
    initial = load_file(str(encoder_dir / "model.safetensors"))
    tuned = load_file(str(out / "model.safetensors"))
    for k, v in initial.items():
        if _expected_layer(f"tower.model.{k}") < DEPTH:
            assert _sha256(tuned[f"tower.model.{k}"]) == _sha256(v), k
        else:
            assert float((tuned[f"tower.model.{k}"] - v).abs().max()) > 1e-4, k


NONFINITE_SCRIPT = '''
import json, os, sys
import torch
from torch import nn
from mmssl.pretrain.distributed import init_distributed
from mmssl.pretrain.engine import build_engine
from mmssl.pretrain.recipe import TrainConfig
from mmssl.pretrain.step import NonFiniteGuard
from mmssl.tools.finetune.rank import train_epoch

rank, world, device = init_distributed()
out = {}
for stage in (0, 2):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    cfg = TrainConfig(steps=10, lr=0.1, warmup_steps=0, zero_stage=stage, precision="fp32", grad_clip=1.0)
    engine, _, _ = build_engine(model, cfg, 2, world)
    guard = NonFiniteGuard(engine, rank=rank, world=world, device=device)
    g = torch.Generator().manual_seed(rank)
    records, weights = [], []
    for step in range(3):
        x, y = torch.randn(2, 4, generator=g), torch.tensor([0, 2])
        if step == 1 and rank == 1:
            x[0, 0] = float("nan")  # this rank's loss is NaN: no rank may update
        expected = float(nn.functional.cross_entropy(engine.module(x).float(), y))
        records.append({**train_epoch(engine, iter([(x, y)]), 1, guard), "own_loss": expected})
        weights.append(engine.module.weight.detach().clone().flatten().tolist())
    out[stage] = {"records": records, "weights": weights}
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:  # one file per rank: printed lines can interleave
    json.dump(out, f)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
os._exit(0)  # gloo may abort in its teardown (see pretrain.worker)
'''


def test_finetuning_steps_through_the_pretraining_step_and_its_nonfinite_guard(tmp_path: Path) -> None:
    """`train_epoch` runs `pretrain.step.optimizer_step` (2 ranks, ZeRO-0 and ZeRO-2): a step whose loss is NaN on
    one rank changes no weight on any rank and is counted; the reported loss is the mean of the finite losses."""
    script = tmp_path / "nonfinite.py"
    script.write_text(NONFINITE_SCRIPT)
    proc = run_ranks(2, [str(script), str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for stage in ("0", "2"):
        a, b = (r[stage] for r in ranks)
        assert a["weights"] == b["weights"]  # the ranks agree after every step
        w0, w1, w2 = a["weights"]
        assert w1 == w0 and w2 != w1  # the NaN step updated nothing, the next finite one did
        assert [r["nonfinite_steps"] for r in a["records"]] == [0, 1, 0]
        for step in (0, 2):  # the mean over both ranks' finite losses
            mean = (a["records"][step]["own_loss"] + b["records"][step]["own_loss"]) / 2
            assert a["records"][step]["train_loss"] == pytest.approx(mean, rel=1e-5)
        assert a["records"][1]["train_loss"] == pytest.approx(a["records"][1]["own_loss"], rel=1e-5)

"""Real DeepSpeed runs on 2 gloo ranks: equivalence with 1 rank, exact resume, export round-trip, summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmssl.architectures.config import build_model
from mmssl.architectures.encoder import Encoder
from mmssl.data_pipelines.shards import resolve_shards
from mmssl.data_pipelines.stream import read_once
from mmssl.pretrain.data import eval_decoders, modality_fields
from mmssl.pretrain.recipe import load_recipe
from mmssl.tools.export.run import consolidated_state_dict, export_run
from tests.conftest import mmssl, run_ranks, tiny_recipe_dict, write_recipe

pytestmark = pytest.mark.distributed


def _weights(run: Path) -> dict[str, torch.Tensor]:
    root = run / "checkpoints"
    state = consolidated_state_dict(root, (root / "latest").read_text().strip())
    return {k: v.detach() for k, v in state.items()}


def _check(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def fixed_runs(asterisk_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int | str, Path]:
    """The same 3 global batches of 16 trained on 1 rank and on 2 ranks (ZeRO-2, fp32); on 2 ranks also with 2
    accumulated micro-batches, ``cached`` (gradient cache) and ``naive`` (the 2-rank runs one after another on the
    same ranks)."""
    tmp = tmp_path_factory.mktemp("fixed")
    recipe = write_recipe(tmp / "r.yaml", tiny_recipe_dict(asterisk_data, train={"steps": 3, "warmup_steps": 1}))
    runs: dict[int | str, Path] = {1: tmp / "ranks1", 2: tmp / "ranks2"}
    _check(run_ranks(1, ["tests/helpers/fixed_batches.py", str(recipe), str(runs[1]), "16",
                         str(tmp / "features1.safetensors")]))
    two = [str(recipe), str(runs[2]), "16", str(tmp / "features2.safetensors")]
    for mode in ("cached", "naive"):
        accumulated = write_recipe(tmp / f"{mode}.yaml", tiny_recipe_dict(
            asterisk_data, train={"steps": 3, "warmup_steps": 1, "grad_accum": 2, "accumulation": mode}))
        runs[mode] = tmp / mode
        two += [str(accumulated), str(runs[mode]), "16", str(tmp / f"{mode}.safetensors")]
    _check(run_ranks(2, ["tests/helpers/fixed_batches.py", *two]))
    return runs


def test_two_ranks_equal_one_rank_on_the_same_global_batches(fixed_runs: dict[int | str, Path]) -> None:
    one, two = _weights(fixed_runs[1]), _weights(fixed_runs[2])
    assert one.keys() == two.keys()
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst <= 2e-6, f"1-rank and 2-rank weights differ by {worst}"
    recipe = load_recipe(fixed_runs[1] / "recipe.yaml")
    initial = build_model(recipe.model, seed=recipe.train.seed).state_dict()
    moved = max(float((one[f"model.{k}"] - v).abs().max()) for k, v in initial.items())
    assert moved > 1e-3  # training really changed the weights, so the comparison is not vacuous


def test_export_reloads_the_training_model_exactly(fixed_runs: dict[int | str, Path], tmp_path: Path) -> None:
    run = fixed_runs[2]
    recipe = load_recipe(run / "recipe.yaml")
    export_run(run, tmp_path / "export")
    live = load_file(str(run.parent / "features2.safetensors"))
    decoders = eval_decoders(recipe)
    batch = next(read_once(resolve_shards(recipe.data.train), fields=modality_fields(recipe), decoders=decoders,
                           batch_size=16))
    for m in ("audio", "text"):
        enc = Encoder.from_dir(tmp_path / "export" / m)
        with torch.no_grad():
            pooled, emb = enc(batch.inputs[m])
        assert float((pooled - live[f"pooled.{m}"]).abs().max()) <= 1e-6
        assert float((emb - live[f"embeddings.{m}"]).abs().max()) <= 1e-6


def test_cached_accumulation_equals_the_large_batch(fixed_runs: dict[int | str, Path]) -> None:
    """2 ranks x 2 accumulated micro-batches of 4 (gradient cache) == 1 rank x 1 batch of 16, and naive
    accumulation (negatives from one micro-batch only) is measurably different."""
    weights = {mode: _weights(fixed_runs[mode]) for mode in ("cached", "naive")}
    large = _weights(fixed_runs[1])
    assert large.keys() == weights["cached"].keys()
    worst = max(float((large[k] - weights["cached"][k]).abs().max()) for k in large)
    assert worst <= 2e-6, f"cached accumulation differs from the large batch by {worst}"
    naive = max(float((large[k] - weights["naive"][k]).abs().max()) for k in large)
    assert naive > 100 * max(worst, 1e-7), f"naive accumulation unexpectedly matched the large batch ({naive})"


@pytest.fixture(scope="module")
def resume_runs(asterisk_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """6 steps straight, and 3 steps (both on the same ranks, `tests.helpers.train_many`) then, through the
    `mmssl pretrain` command in a new job, `train.resume=latest` to 6."""
    from tests.helpers.train_many import Job, run_jobs

    tmp = tmp_path_factory.mktemp("resume")
    recipe = write_recipe(tmp / "r.yaml", tiny_recipe_dict(
        asterisk_data, data={"num_workers": 1}, train={"steps": 6, "log_keys": True, "ckpt_every": 0}))
    straight, split = tmp / "straight", tmp / "split"
    results = run_jobs([Job(str(recipe), [], str(straight)), Job(str(recipe), ["train.stop_at=3"], str(split))])
    assert list(results.values()) == [None, None], results
    assert json.loads((split / "summary.json").read_text())["steps"] == 3
    _check(mmssl("pretrain", str(recipe), "train.resume=latest", "--nproc", "2", "--run-dir", str(split)))
    return {"straight": straight, "split": split}


def test_resume_gives_bit_identical_weights(resume_runs: dict[str, Path]) -> None:
    a, b = _weights(resume_runs["straight"]), _weights(resume_runs["split"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_consumes_the_same_sample_keys(resume_runs: dict[str, Path]) -> None:
    for rank in (0, 1):
        a = (resume_runs["straight"] / "keys" / f"rank{rank}.jsonl").read_text().splitlines()
        b = (resume_runs["split"] / "keys" / f"rank{rank}.jsonl").read_text().splitlines()
        assert len(a) == 6 and a == b
    keys = [json.loads(line)["keys"] for r in (0, 1)
            for line in (resume_runs["straight"] / "keys" / f"rank{r}.jsonl").read_text().splitlines()]
    assert len({k for batch in keys for k in batch}) > 8  # real, varied samples


def test_run_directory_has_summary_curve_and_logs(resume_runs: dict[str, Path]) -> None:
    run = resume_runs["straight"]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("steps", "samples_per_s", "final_loss", "step_time_split_s", "peak_rss_mb_per_rank"):
        assert summary[key] is not None, key
    assert summary["steps"] == 6 and summary["world_size"] == 2
    # what the numbers depend on beyond the recipe: the kernels' vector ISA and the torch build
    assert summary["hardware"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert summary["hardware"]["torch"] == torch.__version__
    assert (summary["hardware"]["gpu"] is None) == (summary["device"] == "cpu")
    assert len(summary["peak_rss_mb_per_rank"]) == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert (run / "logs" / "rank1.log").is_file()
    resolved = load_recipe(run / "recipe.yaml")
    assert resolved.train.steps == 6


@pytest.fixture(scope="module")
def bf16_runs(asterisk_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """3 bf16 steps at ZeRO-3 and at ZeRO-0 (on the same 2 ranks one after the other): stage -> run directory."""
    from tests.helpers.train_many import Job, run_jobs

    tmp = tmp_path_factory.mktemp("bf16")
    jobs = {}
    for stage in (3, 0):
        recipe = write_recipe(tmp / f"zero{stage}.yaml", tiny_recipe_dict(
            asterisk_data, train={"steps": 3, "zero_stage": stage, "precision": "bf16", "ckpt_every": 0}))
        jobs[stage] = Job(str(recipe), [], str(tmp / f"zero{stage}"))
    results = run_jobs(list(jobs.values()))
    assert list(results.values()) == [None, None], results
    return {stage: Path(job.run_dir) for stage, job in jobs.items()}


def test_bf16_zero3_trains_and_exports_from_sharded_state(bf16_runs: dict[int, Path], tmp_path: Path) -> None:
    run = bf16_runs[3]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["zero_stage"] == 3 and summary["precision"] == "bf16"
    assert 0 < summary["final_loss"] < 10
    state = _weights(run)  # fp32 master weights gathered from both ranks' ZeRO-3 partitions
    export_run(run, tmp_path / "export")
    enc = Encoder.from_dir(tmp_path / "export" / "audio")
    for name, value in enc.tower.state_dict().items():
        torch.testing.assert_close(value, state[f"model.towers.audio.{name}"].float(), rtol=0, atol=0)
    recipe_obj = load_recipe(run / "recipe.yaml")
    initial = build_model(recipe_obj.model, seed=recipe_obj.train.seed).towers["audio"].state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in enc.tower.state_dict().items())


def test_bf16_zero0_exports_the_fp32_master_weights(bf16_runs: dict[int, Path], tmp_path: Path) -> None:
    """Without ZeRO, DeepSpeed keeps bf16 module weights and unnamed per-group fp32 master copies; export reads
    the masters by the names the checkpoint records: each rounds to the module's bf16 weight, and they carry
    more precision than bf16 (so they are not the module weights upcast)."""
    run = bf16_runs[0]
    root = run / "checkpoints"
    tag = (root / "latest").read_text().strip()
    module = torch.load(root / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    state = _weights(run)
    assert state.keys() == module.keys()
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k].to(v.dtype), v) for k, v in module.items())
    trained = [k for k in module if k.startswith("model.towers.audio.")]
    assert any(not torch.equal(state[k], module[k].float()) for k in trained)
    export_run(run, tmp_path / "export")
    enc = Encoder.from_dir(tmp_path / "export" / "audio")
    for name, value in enc.tower.state_dict().items():
        torch.testing.assert_close(value, state[f"model.towers.audio.{name}"], rtol=0, atol=0)


def test_mmssl_pretrain_runs_as_the_ranks_of_an_external_launcher(asterisk_data: Path, tmp_path: Path) -> None:
    """The multi-node path of the README on one node: torchrun starts `mmssl pretrain` as every rank."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(asterisk_data, train={"steps": 2}))
    run = tmp_path / "run"
    _check(run_ranks(2, ["-m", "mmssl", "pretrain", str(recipe), "--run-dir", str(run)]))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert load_recipe(run / "recipe.yaml").train.steps == 2

"""Precision as one axis of every run: each tiny recipe in fp32 and bf16, with a resume; each family at ZeRO-3 in
bf16; a bf16 run with a frozen tower resumed bit for bit; bf16 tracking fp32 over 50 steps.

All runs share one set of 2 gloo ranks (`tests.helpers.train_many`), one job after another:

* every tiny recipe (`tests.helpers.tiny_recipes.METHODS`, on the session's real shards) trains 2 steps, saves,
  stops, and resumes to step 3, in fp32 and in bf16 (ZeRO-2): each logged term is finite, the logged loss is
  ``Σ w_i L_i``, steps 1-3 are each logged once, the summary's parameter count equals the meta-device count;
* one tiny recipe per family (`FAMILIES`) does the same at ZeRO-3 in bf16, and its last checkpoint exports;
  ``clip-tiny`` also at ZeRO-0 and ZeRO-1 in bf16 (DeepSpeed's other two bf16 optimizers), its export reading the
  fp32 master weights;
* the tiny CLAP-style recipe with a frozen text tower in bf16: 6 steps straight, and 3 + resume to 6 — the
  consolidated weights and the whole saved module state (frozen weights included) are bit-identical;
* ``clip-tiny`` 50 steps in fp32 and in bf16 from the same seed, the learning rate warming up over all 50: the mean
  loss of each 10-step window of the bf16 curve is within `WINDOW_RTOL` (2 %) of the fp32 one, and every step within
  `STEP_ATOL` (0.25; single steps of two trajectories that part after a few updates differ by up to about 0.12 on a
  batch of 64). The warm-up spans the curve because at the end of the recipe's 20-step warm-up, on these 200 images,
  fp32 itself jumps by up to 0.5 from one step to the next, and a single-step comparison would then measure where
  each run's jumps land rather than its precision.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from mmssl.pretrain.recipe import load_recipe
from mmssl.tools.export.run import consolidated_state_dict, export_run
from mmssl.tools.recipes_check import count_parameters
from tests.conftest import tiny_recipe_dict, write_recipe
from tests.helpers.tiny_recipes import FAMILIES, METHODS, tiny_overrides
from tests.helpers.train_many import Job, run_jobs

PRECISIONS = ("fp32", "bf16")
CURVE_STEPS, WINDOW = 50, 10
WINDOW_RTOL = 0.02  # |mean bf16 - mean fp32| / mean fp32 over each 10-step window (measured: at most 0.8 %)
STEP_ATOL = 0.25  # |loss_bf16 - loss_fp32| at any step (the loss starts at ln 64 = 4.16)
FROZEN_STEPS, FROZEN_STOP = 6, 3


def _stop_and_resume(source: str, overrides: list[str], run_dir: Path) -> list[Job]:
    return [Job(source, [*overrides, "train.stop_at=2", "train.ckpt_every=2"], str(run_dir)),
            Job(source, [*overrides, "train.ckpt_every=2", "train.resume=latest"], str(run_dir))]


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, asterisk_data: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[Any, Any]:
    """Every run of the module docstring on one set of ranks: key -> (source, overrides, run dir, error or None)."""
    root = tmp_path_factory.mktemp("precision")
    jobs: dict[Any, list[Job]] = {}
    for method in METHODS:
        try:
            base = tiny_overrides(method, request)
        except pytest.skip.Exception:
            continue
        for precision in PRECISIONS:
            jobs[method, precision, 2] = _stop_and_resume(f"{method}-tiny", [*base, f"train.precision={precision}"],
                                                          root / f"{method}-{precision}")
    if ("clip", "bf16", 2) in jobs:  # the other stages in bf16: ZeRO-0 (FP16_Optimizer), ZeRO-1 (BF16_Optimizer)
        for stage in (0, 1):
            jobs["clip", "bf16", stage] = _stop_and_resume("clip-tiny", [*tiny_overrides("clip", request),
                                                                         "train.precision=bf16",
                                                                         f"train.zero_stage={stage}"],
                                                           root / f"clip-bf16-z{stage}")
    for family, method in FAMILIES.items():
        if (method, "bf16", 2) in jobs:
            base = tiny_overrides(method, request)
            jobs[method, "bf16", 3] = _stop_and_resume(f"{method}-tiny", [*base, "train.precision=bf16",
                                                                          "train.zero_stage=3"], root / f"{family}-z3")
    frozen = write_recipe(root / "frozen.yaml", tiny_recipe_dict(asterisk_data, model={
        "text": {**tiny_recipe_dict(asterisk_data)["model"]["text"], "frozen": True}}, train={
        "steps": FROZEN_STEPS, "precision": "bf16", "ckpt_every": FROZEN_STOP, "keep_last": 2}))
    jobs["frozen", "straight"] = [Job(str(frozen), [], str(root / "frozen-straight"))]
    jobs["frozen", "resumed"] = [Job(str(frozen), [f"train.stop_at={FROZEN_STOP}"], str(root / "frozen-resumed")),
                                 Job(str(frozen), ["train.resume=latest"], str(root / "frozen-resumed"))]
    if ("clip", "fp32", 2) in jobs:
        base = tiny_overrides("clip", request, steps=CURVE_STEPS)
        for precision in PRECISIONS:
            jobs["curve", precision] = [Job("clip-tiny", [*base, f"train.precision={precision}",
                                                          f"train.warmup_steps={CURVE_STEPS}"],
                                            str(root / f"curve-{precision}"))]
    results = run_jobs([j for group in jobs.values() for j in group], timeout=1500)
    return {key: (group[-1].source, group[-1].overrides, Path(group[-1].run_dir),
                  next((results[j.run_dir] for j in group if results[j.run_dir]), None))
            for key, group in jobs.items()}


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _check_resumed_run(source: str, overrides: list[str], run: Path, precision: str, stage: int) -> None:
    recipe = load_recipe(source, overrides)
    weights = {term: cfg.weight for term, cfg in recipe.objectives.terms.items()}
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        terms = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("loss/") and k.count("/") == 1}
        assert set(terms) == set(weights), f"{source}: logged terms {sorted(terms)} != recipe {sorted(weights)}"
        assert all(math.isfinite(v) for v in (record["loss"], *terms.values())), record
        total = sum(weights[t] * v for t, v in terms.items())
        assert math.isclose(record["loss"], total, rel_tol=1e-4, abs_tol=1e-5), (record["loss"], total)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["precision"], summary["zero_stage"]) == (3, precision, stage)
    assert summary["parameters"] == count_parameters(recipe).model_total
    assert "resumed from step_00000002" in (run / "logs" / "rank0.log").read_text()


@pytest.mark.distributed
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", METHODS)
def test_tiny_recipe_trains_and_resumes(method: str, precision: str, runs: dict[Any, Any]) -> None:
    if (method, precision, 2) not in runs:
        pytest.skip(f"{method}-tiny: its data is not installed (see docs/recipes.md)")
    source, overrides, run, error = runs[method, precision, 2]
    assert error is None, error[-3000:]
    _check_resumed_run(source, overrides, run, precision, 2)
    if method == "flava":  # every source of the mix contributed rows
        rows = json.loads((run / "summary.json").read_text())["rows_per_source"]
        assert set(rows) == {"pairs", "images", "captions"} and all(n > 0 for n in rows.values()), rows


@pytest.mark.distributed
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_trains_resumes_and_exports_at_zero3_in_bf16(family: str, runs: dict[Any, Any],
                                                                   tmp_path: Path) -> None:
    method = FAMILIES[family]
    if (method, "bf16", 3) not in runs:
        pytest.skip(f"{method}-tiny: its data is not installed (see docs/recipes.md)")
    source, overrides, run, error = runs[method, "bf16", 3]
    assert error is None, error[-3000:]
    _check_resumed_run(source, overrides, run, "bf16", 3)
    index = export_run(run, tmp_path / "export")
    assert index["family"] == family and Path(index["model"]).is_dir()
    state = consolidated_state_dict(run / "checkpoints", "step_00000003")
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())  # the fp32 masters


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1])
def test_bf16_trains_resumes_and_exports_its_fp32_masters_at_zero_stage(stage: int, runs: dict[Any, Any],
                                                                        tmp_path: Path) -> None:
    if ("clip", "bf16", stage) not in runs:
        pytest.skip("clip-tiny: Fashion-MNIST is not installed")
    source, overrides, run, error = runs["clip", "bf16", stage]
    assert error is None, error[-3000:]
    _check_resumed_run(source, overrides, run, "bf16", stage)
    state = consolidated_state_dict(run / "checkpoints", "step_00000003")
    module = torch.load(run / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=True)["module"]
    trained = [k for k, v in module.items() if v.dtype == torch.bfloat16]
    assert trained and all(state[k].dtype == torch.float32 for k in trained)
    assert all(torch.equal(state[k].to(torch.bfloat16), module[k]) for k in trained)  # masters round to the weights
    assert any(not torch.equal(state[k], module[k].float()) for k in trained)  # and hold more than bf16 does
    assert export_run(run, tmp_path / "export")["family"] == "fusion_free"


@pytest.mark.distributed
def test_bf16_resume_with_a_frozen_tower_is_bit_identical(runs: dict[Any, Any]) -> None:
    (_, _, straight, error_a), (_, _, resumed, error_b) = runs["frozen", "straight"], runs["frozen", "resumed"]
    assert error_a is None and error_b is None, (error_a or error_b)[-3000:]
    tag = f"step_{FROZEN_STEPS:08d}"
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["frozen_parameters"] > 0
    got, want = (consolidated_state_dict(r / "checkpoints", tag) for r in (resumed, straight))
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    module = [torch.load(r / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                         weights_only=True)["module"] for r in (resumed, straight)]
    assert module[0].keys() == module[1].keys()
    assert [k for k in module[1] if not torch.equal(module[0][k], module[1][k])] == []
    assert [r["loss"] for r in _records(resumed)] == [r["loss"] for r in _records(straight)]


@pytest.mark.distributed
def test_bf16_tracks_the_fp32_loss_curve(runs: dict[Any, Any]) -> None:
    if ("curve", "fp32") not in runs:
        pytest.skip("Fashion-MNIST is not installed")
    curves = {}
    for precision in PRECISIONS:
        _, _, run, error = runs["curve", precision]
        assert error is None, error[-3000:]
        curves[precision] = [r["loss"] for r in _records(run)]
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert len(fp32) == len(bf16) == CURVE_STEPS
    windows = {p: [sum(c[i:i + WINDOW]) / WINDOW for i in range(0, CURVE_STEPS, WINDOW)] for p, c in curves.items()}
    assert windows["fp32"][-1] < windows["fp32"][0] - 0.1  # it learns: agreement is not that of two flat curves
    worst = max(abs(a - b) for a, b in zip(fp32, bf16, strict=True))
    relative = [abs(b - a) / a for a, b in zip(windows["fp32"], windows["bf16"], strict=True)]
    print(f"bf16 vs fp32 over {CURVE_STEPS} steps: max |step diff| {worst:.4f}, window means "
          f"{[round(v, 4) for v in windows['fp32']]} / {[round(v, 4) for v in windows['bf16']]}")
    assert max(relative) <= WINDOW_RTOL, relative
    assert worst <= STEP_ATOL, worst


def _accumulation_dtypes(rank: int, world: int, data: str, run_dir: str) -> dict[int, list[str]]:
    from mmssl.pretrain.recipe import Recipe, _Origin, from_dict
    from mmssl.pretrain.trainer import Trainer

    out = {}
    for stage in (1, 2, 3):
        raw = tiny_recipe_dict(Path(data), train={"precision": "bf16", "zero_stage": stage, "grad_accum": 2})
        engine = Trainer(from_dict(Recipe, raw, path=(), origin=_Origin("test", {})), Path(run_dir) / str(stage)).engine
        optimizer = engine.optimizer
        accumulate = getattr(optimizer, "grad_acc_dtype", None) or optimizer.gradient_accumulation_dtype
        out[stage] = [str(engine.get_data_types()[0]), str(accumulate), str(engine.communication_data_type),
                      type(optimizer).__name__]
    return out


@pytest.mark.distributed
def test_bf16_gradients_accumulate_and_reduce_in_fp32(asterisk_data: Path, tmp_path: Path) -> None:
    """The engines a bf16 recipe builds at ZeRO 1-3 (ZeRO-1: DeepSpeed's BF16_Optimizer; 2-3: its ZeRO optimizers)
    hold bf16 weights but accumulate gradients, and reduce them across ranks, in fp32."""
    from tests.helpers.spawn import spawn_ranks

    for stages in spawn_ranks(_accumulation_dtypes, str(asterisk_data), str(tmp_path)):
        assert stages[1][3] == "BF16_Optimizer" and stages[2][3] == "DeepSpeedZeroOptimizer"
        for stage, (model, accumulate, communicate, _) in stages.items():
            assert (model, accumulate, communicate) == ("torch.bfloat16", "torch.float32", "torch.float32"), stage

"""`mmssl bench --compare open_clip`: the two CLIP builds match, the losses agree, the report has both rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmssl.tools.bench import open_clip as bench
from tests.conftest import mmssl

os.environ.setdefault("DS_ACCELERATOR", "cpu")
TINY = ["--steps", "1", "--trials", "2", "--batch", "8", "--width", "32", "--depth", "1", "--heads", "2",
        "--image-size", "16", "--patch-size", "8", "--context", "12", "--embed-dim", "16", "--limit", "32",
        "--precisions", "fp32", "--no-memory", "--no-real-loader"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmssl.data_pipelines.sources import fashion_mnist

    if not fashion_mnist.ROOT.is_dir():
        pytest.skip("Fashion-MNIST (dataset-fashion-mnist) is not installed")
    return tmp_path_factory.mktemp("bench")


def test_clip_loss_equals_mmssl_contrastive_loss() -> None:
    import open_clip

    from mmssl.objectives.contrastive import contrastive_loss

    torch.manual_seed(0)
    a, b = torch.randn(12, 16, dtype=torch.float64), torch.randn(12, 16, dtype=torch.float64)
    scale = torch.tensor(14.3, dtype=torch.float64)
    reference = open_clip.ClipLoss()(F.normalize(a, dim=-1), F.normalize(b, dim=-1), scale)
    ours, _ = contrastive_loss(a.float(), b.float(), scale.float(), gather=False)
    assert abs(float(ours) - float(reference)) < 1e-6
    # and both equal the formula written out: mean of the two cross-entropies over the diagonal
    logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    formula = -(logits.log_softmax(1).diagonal().mean() + logits.log_softmax(0).diagonal().mean()) / 2
    assert abs(float(reference) - float(formula)) < 1e-9


def test_same_model_sizes(workdir: Path) -> None:
    """Both builds have the same towers and (within open_clip's extra pre-norm and biases, 1 %) the
    same parameter count; one open_clip step on mmssl's decoded batch changes open_clip's weights."""
    from mmssl.pretrain.recipe import load_recipe
    from mmssl.tools.recipes_check import count_parameters

    args = bench.parse_args([*TINY, "--workdir", str(workdir)])
    size = bench._size(args)
    recipe = bench.prepare(workdir, size, args.batch, "fp32", args.limit)
    vocab = bench.vocab_size(recipe)
    open_clip_side = bench.OpenClipSide(size, vocab, "fp32", args.batch, workdir)
    ours = count_parameters(load_recipe(str(recipe)))
    theirs = sum(p.numel() for p in open_clip_side.model.parameters())
    assert abs(ours.trainable / theirs - 1) < 0.01, (ours, theirs)
    visual, text = open_clip_side.model.visual, open_clip_side.model.transformer
    assert len(visual.transformer.resblocks) == len(text.resblocks) == args.depth
    assert open_clip_side.model.vocab_size == vocab
    batch = bench.decoded_batches(recipe, 1)
    before = {n: p.detach().clone() for n, p in open_clip_side.model.named_parameters()}
    open_clip_side.run(batch)
    assert any(not torch.equal(before[n], p) for n, p in open_clip_side.model.named_parameters())


def test_set_overrides_mmssls_recipe(workdir: Path) -> None:
    """``--set`` reaches the recipe every mmssl side of the benchmark loads (the profiles before / after a setting)."""
    from mmssl.pretrain.recipe import load_recipe

    args = bench.parse_args([*TINY, "--workdir", str(workdir), "--set", "data.trim_padding=false",
                             "train.attention_kernel=torch"])
    recipe = load_recipe(str(bench.prepare(workdir, bench._size(args), args.batch, "bf16", args.limit,
                                           overrides=args.set)))
    assert (recipe.data.trim_padding, recipe.train.attention_kernel, recipe.train.precision) == (False, "torch", "bf16")
    assert "--set" in bench._size_argv(args)  # the memory child builds the same recipe
    from mmssl.pretrain.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"data\.trim_paddnig"):  # a misspelt key is named, not ignored
        bench.prepare(workdir, bench._size(args), args.batch, "fp32", args.limit,
                      overrides=["data.trim_paddnig=false"])


def test_mmssl_bench_prints_the_side_by_side_table(workdir: Path) -> None:
    """`mmssl bench --compare open_clip` (its own process: the mmssl side starts a DeepSpeed process group) prints
    one row per framework, the ratio column equals samples/s over open_clip's, and both sides trained."""
    out = workdir / "out.json"
    done = mmssl("bench", "--compare", "open_clip", *TINY, "--workdir", str(workdir / "cli"), "--json", str(out),
                 timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    oc, mm = result["rows"]
    assert [oc["framework"], mm["framework"]] == ["open_clip", "mmssl"]
    assert oc["ratio"] == pytest.approx(1.0)
    assert mm["ratio"] == pytest.approx(mm["samples_per_s"] / oc["samples_per_s"])
    assert all(r["samples_per_s"] > 0 for r in result["rows"])
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| precision |"))
    assert "ratio mmssl/open_clip" in lines[header]
    assert sum(line.startswith("| fp32 |") for line in lines[header:]) == 2
    assert abs(result["parameters"]["mmssl"] / result["parameters"]["open_clip"] - 1) < 0.01
    # MFU: counted FLOPs per sample over the matmul peak measured in the same process (the same model, so within
    # 5 % on both sides), a fraction of the peak
    peak = result["matmul_peak_flops"]["fp32"]
    assert peak > 1e8 and "MFU" in lines[header] and result["config"]["device"] == "cpu"
    assert oc["flops_per_sample"] == pytest.approx(mm["flops_per_sample"], rel=0.05)
    for row in (oc, mm):
        assert row["mfu"] == pytest.approx(row["samples_per_s"] * row["flops_per_sample"] / peak)
        assert 0 < row["mfu"] < 1


def test_bad_options_name_the_option() -> None:
    with pytest.raises(bench.ToolError, match="--width 30 is not a multiple of --heads 4"):
        bench.parse_args(["--width", "30", "--heads", "4"])
    with pytest.raises(bench.ToolError, match="--trials"):
        bench.parse_args(["--trials", "1"])
    with pytest.raises(bench.ToolError, match="--bare times an fp32 step; --precisions bf16 has no fp32"):
        bench.parse_args(["--bare", "--precisions", "bf16"])


def test_best_against_best_takes_each_sides_fastest_row() -> None:
    """Each side's fastest in-memory row per precision (its defaults or compiled), never the end-to-end row."""
    def row(precision: str, framework: str, rate: float, data: str = "pre-decoded, in memory") -> dict:
        return {"precision": precision, "framework": framework, "samples_per_s": rate, "data": data}

    rows = [row("fp32", "open_clip", 100.0), row("fp32", "mmssl", 120.0),
            row("fp32", "open_clip + torch.compile", 110.0), row("fp32", "mmssl + train.compile", 115.0),
            row("fp32", "mmssl (Trainer.fit)", 500.0, "shards, ShardStream, 1 worker"),
            row("bf16", "open_clip", 150.0), row("bf16", "mmssl", 160.0),
            row("bf16", "open_clip + torch.compile", 140.0), row("bf16", "mmssl + train.compile", 200.0)]
    best = bench.best_against_best(rows)
    assert [(b["precision"], b["mmssl"], b["open_clip"]) for b in best] == [
        ("fp32", "mmssl", "open_clip + torch.compile"), ("bf16", "mmssl + train.compile", "open_clip")]
    assert [round(b["ratio"], 4) for b in best] == [round(120 / 110, 4), round(200 / 150, 4)]


def _bare_and_engine_steps(rank: int, world: int, workdir: str) -> dict[str, float]:
    """One bare-torch step and one engine step from the same weights (in a spawned rank: the engine needs a process
    group, which must not outlive the test in pytest's own process)."""
    from mmssl.tools.bench.bare import BareTorchSide

    args = bench.parse_args([*TINY, "--workdir", workdir, "--bare"])
    recipe = bench.prepare(Path(workdir), bench._size(args), args.batch, "fp32", args.limit)
    batch = bench.decoded_batches(recipe, 1)[0]
    mmssl_side = bench.MmsslSide(recipe, Path(workdir) / "bare-run")
    bare = BareTorchSide(mmssl_side)
    task = mmssl_side.model
    start = {k: v.clone() for k, v in task.state_dict().items()}
    bare.step(batch)
    after_bare = {k: v.clone() for k, v in task.state_dict().items()}
    task.load_state_dict(start)
    mmssl_side.step(batch)
    after_engine = task.state_dict()
    changed = [k for k in start if not torch.equal(start[k], after_bare[k])]
    moved = max(float((after_bare[k] - start[k]).abs().max()) for k in changed)
    apart = max(float((after_engine[k] - after_bare[k]).abs().max()) for k in changed)
    return {"changed": len(changed), "moved": moved, "apart": apart}


def test_the_bare_torch_step_makes_the_engines_update(workdir: Path) -> None:
    """``--bare``: from the same weights, one plain-torch step of mmssl's task (fp32) makes the same update as the
    DeepSpeed ZeRO-0 engine's step, so the row times the same work without the engine."""
    from tests.helpers.spawn import spawn_ranks

    [found] = spawn_ranks(_bare_and_engine_steps, str(workdir), world=1)
    print(found)
    assert found["changed"] > 10
    assert found["apart"] < 1e-3 * found["moved"]  # the largest weight change vs the largest disagreement

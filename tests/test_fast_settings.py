"""The speed settings: AdamW's implementations compute the same update (within rounding), a compiled run keeps the
loss curve of the eager one, a compiled run resumes bit-identically, cutting the text padding (``data.trim_padding``,
on in every other run here) keeps the curve of the full-length run, and the settings are checked before launch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mmssl.data_pipelines.batch import Batch
from mmssl.pretrain.engine import OPTIMIZER_IMPLS, check_train_config
from mmssl.pretrain.precision import attention_backends
from mmssl.pretrain.recipe import RecipeError, TrainConfig
from mmssl.pretrain.task import PretrainTask
from tests.helpers.tiny_recipes import tiny_overrides

STEPS = 8


def test_adamw_implementations_give_the_same_update() -> None:
    """One AdamW step (with weight decay) per implementation from the same state: equal within float rounding."""
    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    grads = [torch.randn_like(p) for p in start]
    updated = {}
    for impl, kwargs in OPTIMIZER_IMPLS.items():
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, **kwargs)
        for _ in range(3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
        updated[impl] = [p.detach() for p in params]
    for impl in ("fused", "foreach"):
        for ours, loop in zip(updated[impl], updated["loop"], strict=True):
            torch.testing.assert_close(ours, loop, rtol=1e-6, atol=1e-7)


def test_settings_are_checked_before_launch() -> None:
    with pytest.raises(RecipeError, match=r"train.optimizer_impl must be one of \['fused', 'foreach', 'loop'\], "
                                          r"got 'adam'"):
        check_train_config(TrainConfig(optimizer_impl="adam"))
    with pytest.raises(RecipeError, match=r"train.compile=true with train.zero_stage=3"):
        check_train_config(TrainConfig(compile=True, zero_stage=3))
    with pytest.raises(RecipeError, match=r"train.attention_kernel must be one of \['auto', 'torch', 'math', "
                                          r"'flash', 'efficient'\], got 'fast'"):
        check_train_config(TrainConfig(attention_kernel="fast"))


def test_attention_kernel_auto_is_the_math_path_on_the_cpu_in_bf16_only() -> None:
    from torch.nn.attention import SDPBackend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_backends(TrainConfig(precision="bf16"), cpu) == [SDPBackend.MATH]
    assert attention_backends(TrainConfig(precision="fp32"), cpu) is None  # torch's choice
    assert attention_backends(TrainConfig(precision="bf16"), cuda) is None
    assert attention_backends(TrainConfig(precision="bf16", attention_kernel="torch"), cpu) is None
    assert attention_backends(TrainConfig(attention_kernel="flash"), cuda) == [SDPBackend.FLASH_ATTENTION]


class _Attend(torch.nn.Module):
    def forward(self, inputs: dict[str, torch.Tensor], present: object) -> torch.Tensor:
        x = inputs["x"]
        return torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)


@pytest.mark.parametrize(("backends", "ran", "not_ran"), [
    (None, "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::bmm"),
    ("math", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu")])
def test_the_task_runs_its_attention_on_the_chosen_kernel(backends: str | None, ran: str, not_ran: str) -> None:
    """What the profiler sees of one forward + backward of a task over a model that attends (bf16, CPU): torch's
    fused flash kernel by default, matmuls (``bmm``) and a softmax under ``train.attention_kernel: math``."""
    from torch.nn.attention import SDPBackend
    from torch.profiler import ProfilerActivity, profile

    task = PretrainTask(_Attend(), {}, {}, [SDPBackend.MATH] if backends else None)
    x = torch.randn(2, 2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    batch = Batch(inputs={"x": x}, present={"x": torch.ones(2, dtype=torch.bool)}, keys=["a", "b"])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        task(batch, mode="outputs").float().sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert ran in names and not_ran not in names, sorted(names)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# clip-tiny's image tower as a small ResNet (``model_args`` sets its widths)
CNN = ["model.image.arch=resnet10t", "model.image.width=null", "model.image.depth=null", "model.image.heads=null",
       "model.image.patch_size=null", "model.image.init=timm", "model.image.pool=avg",
       "model.image.model_args={channels: [16, 32, 64, 128]}"]


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.helpers.train_many import Job, run_jobs

    root = tmp_path_factory.mktemp("fast")
    # max_len 32 for Fashion-MNIST captions of at most 24 pieces: data.trim_padding (default on) cuts them
    base = [*tiny_overrides("clip", request, steps=STEPS), f"train.ckpt_every={STEPS // 2}", "train.keep_last=3",
            "model.text.max_len=32"]
    jobs = {"eager": Job("clip-tiny", base, str(root / "eager")),
            "untrimmed": Job("clip-tiny", [*base, "data.trim_padding=false"], str(root / "untrimmed")),
            # the gradient cache (2 micro-batches a step): cut together to one length
            "cached": Job("clip-tiny", [*base, "train.grad_accum=2"], str(root / "cached")),
            "cached-untrimmed": Job("clip-tiny", [*base, "train.grad_accum=2", "data.trim_padding=false"],
                                    str(root / "cached-untrimmed")),
            "bf16": Job("clip-tiny", [*base, "train.precision=bf16"], str(root / "bf16")),
            "bf16-untrimmed": Job("clip-tiny", [*base, "train.precision=bf16", "data.trim_padding=false"],
                                  str(root / "bf16-untrimmed")),
            # bf16 with a frozen image tower, stopped half-way and resumed, the padding cut
            "frozen": Job("clip-tiny", [*base, "train.precision=bf16", "model.image.frozen=true"],
                          str(root / "frozen")),
            "frozen-split": Job("clip-tiny", [*base, "train.precision=bf16", "model.image.frozen=true",
                                              f"train.stop_at={STEPS // 2}"], str(root / "frozen-split")),
            "frozen-resumed": Job("clip-tiny", [*base, "train.precision=bf16", "model.image.frozen=true",
                                                "train.resume=latest"], str(root / "frozen-split")),
            "loop": Job("clip-tiny", [*base, "train.optimizer_impl=loop"], str(root / "loop")),
            "compiled": Job("clip-tiny", [*base, "train.compile=true"], str(root / "compiled")),
            "split": Job("clip-tiny", [*base, "train.compile=true", f"train.stop_at={STEPS // 2}"],
                         str(root / "split")),
            "resumed": Job("clip-tiny", [*base, "train.compile=true", "train.resume=latest"], str(root / "split")),
            # a ResNet image tower: train.channels_last (auto: on for it) against NCHW, fp32 and bf16, and resumed
            "cnn": Job("clip-tiny", [*base, *CNN], str(root / "cnn")),
            "cnn-nchw": Job("clip-tiny", [*base, *CNN, "train.channels_last=false"], str(root / "cnn-nchw")),
            "cnn-bf16": Job("clip-tiny", [*base, *CNN, "train.precision=bf16"], str(root / "cnn-bf16")),
            "cnn-bf16-nchw": Job("clip-tiny", [*base, *CNN, "train.precision=bf16", "train.channels_last=false"],
                                 str(root / "cnn-bf16-nchw")),
            "cnn-split": Job("clip-tiny", [*base, *CNN, f"train.stop_at={STEPS // 2}"], str(root / "cnn-split")),
            "cnn-resumed": Job("clip-tiny", [*base, *CNN, "train.resume=latest"], str(root / "cnn-split"))}
    results = run_jobs(list(jobs.values()), timeout=900)
    for name, job in jobs.items():
        if name not in ("split", "frozen-split", "cnn-split"):
            assert results[job.run_dir] is None, f"{name}: {results[job.run_dir]}"
    return {name: Path(job.run_dir) for name, job in jobs.items()}


@pytest.mark.distributed
def test_compiled_and_loop_runs_keep_the_eager_fused_curve(runs: dict[str, Path]) -> None:
    """2 ranks, clip-tiny, 8 steps from the same seed: the default (fused AdamW, eager towers) against AdamW's loop
    and against compiled towers, step by step (the same math in another order of rounding)."""
    eager = _losses(runs["eager"])
    assert len(eager) == STEPS
    for name in ("loop", "compiled"):
        other = _losses(runs[name])
        worst = max(abs(a - b) for a, b in zip(eager, other, strict=True))
        print(f"{name}: max |loss - eager| over {STEPS} steps {worst:.2e}")
        assert worst < 1e-3, (name, eager, other)


@pytest.mark.distributed
def test_a_compiled_run_resumes_bit_identically(runs: dict[str, Path]) -> None:
    assert _losses(runs["split"]) == _losses(runs["compiled"])


@pytest.mark.distributed
def test_cutting_the_text_padding_keeps_the_curve(runs: dict[str, Path]) -> None:
    """2 ranks, clip-tiny with ``max_len`` 32, with and without the gradient cache over 2 micro-batches, and in
    bf16: with the padding cut the text tower runs at most 80 % of the loaded positions, and the loss curve equals
    the full-length run's step by step (the same math: the cut columns are padding in every row; only the rounding
    of shorter rows differs)."""
    # bf16: the same math in bf16 matmuls whose blocking follows the shorter shapes (measured 6.0e-04 over 8 steps)
    for cut, full, bound in (("eager", "untrimmed", 1e-4), ("cached", "cached-untrimmed", 1e-4),
                             ("bf16", "bf16-untrimmed", 5e-3)):
        summaries = {name: json.loads((runs[name] / "summary.json").read_text()) for name in (cut, full)}
        computed = summaries[cut]["token_positions_computed"]["text"]
        print(f"{cut}: text positions computed with the cut: {computed:.1%} of those loaded")
        assert 0.2 < computed <= 0.8
        assert summaries[full]["token_positions_computed"] == {}
        losses, reference = _losses(runs[cut]), _losses(runs[full])
        worst = max(abs(a - b) for a, b in zip(losses, reference, strict=True))
        print(f"{cut}: max |loss(cut) - loss(full length)| over {STEPS} steps {worst:.2e}")
        assert len(losses) == STEPS and worst < bound, (cut, losses, reference)


@pytest.mark.distributed
def test_a_cut_bf16_run_with_a_frozen_tower_resumes_bit_identically(runs: dict[str, Path]) -> None:
    summary = json.loads((runs["frozen-split"] / "summary.json").read_text())
    assert summary["frozen_parameters"] > 0 and summary["token_positions_computed"]["text"] < 1
    assert _losses(runs["frozen-split"]) == _losses(runs["frozen"])


@pytest.mark.distributed
def test_channels_last_inputs_keep_the_curve_and_resume_bit_identically(runs: dict[str, Path]) -> None:
    """2 ranks, clip-tiny with a ResNet image tower: ``train.channels_last`` auto switches that tower (the ViT-free
    text tower has none), and the loss curve follows the NCHW run's, in fp32 and bf16; stopped half-way and resumed,
    the run repeats the uninterrupted one bit for bit. The curves part by more than the other settings' (measured
    1.8e-03 fp32, 7.8e-03 bf16 over 8 steps; AdamW's loop vs fused 8.6e-06): the convolutions sum in another order,
    a relative difference of about 1e-5 in the gradients, which AdamW's normalised update magnifies where a gradient
    is near zero (BatchNorm over 8 samples of 1 x 1 maps). Each layout is as close to float64 as the other
    (`tests/test_layout.py`)."""
    for on, off, bound in (("cnn", "cnn-nchw", 5e-3), ("cnn-bf16", "cnn-bf16-nchw", 3e-2)):
        towers = {name: json.loads((runs[name] / "summary.json").read_text())["channels_last_towers"]
                  for name in (on, off)}
        assert towers == {on: ["towers.image"], off: []}
        losses, reference = _losses(runs[on]), _losses(runs[off])
        worst = max(abs(a - b) for a, b in zip(losses, reference, strict=True))
        print(f"{on}: max |loss(channels last) - loss(NCHW)| over {STEPS} steps {worst:.2e}")
        assert len(losses) == STEPS and worst < bound, (on, losses, reference)
    assert _losses(runs["cnn-split"]) == _losses(runs["cnn"])

"""No host-device synchronisation inside a training step (what a CUDA run needs to keep the GPU fed).

On 2 real ranks, three recipes — contrastive (the tiny CLAP-style recipe), an ALBEF-style hybrid (``albef-tiny``:
momentum distillation with queues + hard-negative matching + cross-modal MLM) and a masked one (``flava-tiny``: MAE,
MLM and matching on mixed sources) — run 2 warm-up steps, then 3 non-logging steps under a ``TorchDispatchMode``
that records every ``aten._local_scalar_dense`` (what ``.item()``, ``bool()``, ``int()``, ``float()`` of a tensor
dispatch to) and every ``Tensor.tolist`` / ``.numpy`` / ``.cpu`` call (device-to-host copies; they do not reach the
dispatcher on CPU tensors, so they are wrapped for the test). Each event is attributed to the innermost frame that
belongs to mmssl or to DeepSpeed. mmssl must have none.

Not counted, by construction of a CPU test, and named here so the reader can check them: reads of tensors that live
on the host anyway — `objectives.distributed.host_all_gather` (lengths exchanged over gloo),
`data_pipelines.batch.trim_padding` (the longest row of the host batch's attention mask, read before the batch is
copied to the device), the masks the model draws
from the host batch (`architectures.modalities.masking`'s generators, `objectives.masking.bert_mask`) and the
counts objectives read off them (`objectives.masking.host_row_counts`). DeepSpeed's own reads (its ZeRO optimizer
reads the gradient norm on the host every step, for clipping and its non-finite check, which is mmssl's guard) are
reported, not asserted.
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import ROOT, tiny_recipe_dict, write_recipe
from tests.helpers.spawn import spawn_ranks
from tests.helpers.tiny_recipes import tiny_overrides

HOST_SIDE = ("host_all_gather", "trim_padding", "bert_mask", "host_row_counts", "random_token_mask", "tube_mask",
             "span_mask", "block_mask", "time_span_mask")
OURS = tuple(str(ROOT / room) for room in ("pretrain", "objectives", "architectures", "data_pipelines"))


def _owner(stack: list[traceback.FrameSummary]) -> str | None:
    """"mmssl", "deepspeed", or None for reads of host-side data (see the module docstring)."""
    if any(f.name in HOST_SIDE for f in stack):
        return None
    for frame in reversed(stack):
        if "/deepspeed/" in frame.filename:
            return "deepspeed"
        if frame.filename.startswith(OURS):
            return "mmssl"
    return "mmssl"  # called from the test's own step loop


class _Reads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.events: collections.Counter[tuple[str, str]] = collections.Counter()

    def record(self, what: str) -> None:
        stack = traceback.extract_stack()[:-2]
        owner = _owner(stack)
        if owner is not None:
            inner = next((f for f in reversed(stack) if f.filename.startswith(OURS) or "/deepspeed/" in f.filename),
                         stack[-1])
            self.events[(owner, f"{what} at {Path(inner.filename).name}:{inner.lineno}")] += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.record("_local_scalar_dense")
        return func(*args, **(kwargs or {}))


def _count_steps(rank: int, world: int, recipe: str, overrides: list[str], run_dir: str) -> dict[str, Any]:
    from mmssl.pretrain.recipe import load_recipe
    from mmssl.pretrain.trainer import Trainer

    cfg = load_recipe(recipe, [*overrides, "train.steps=100", "train.log_every=100", "train.ckpt_every=0",
                               "train.tensorboard=false", "data.num_workers=1"])
    trainer = Trainer(cfg, Path(run_dir))
    for _ in range(2):  # warm-up: first-step work (codebook fits, pseudo-labels, allocation) is not per-step
        trainer._record(trainer.step(), {})
    reads = _Reads()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu")}

    def wrap(name: str) -> Any:
        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            reads.record(f"Tensor.{name}")
            return originals[name](self, *args, **kwargs)
        return method

    try:
        for name in originals:
            setattr(torch.Tensor, name, wrap(name))
        with reads:
            for _ in range(3):
                trainer._record(trainer.step(), {})
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    out: dict[str, Any] = {"mmssl": {}, "deepspeed": {}}
    for (owner, where), n in reads.events.items():
        out[owner][where] = n
    return out


@pytest.fixture(scope="module")
def contrastive_recipe(asterisk_data: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("syncs") / "contrastive.yaml"
    return str(write_recipe(path, tiny_recipe_dict(asterisk_data, train={"precision": "bf16"})))


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["contrastive", "albef", "flava"])
def test_training_steps_never_wait_for_the_device(case: str, request: pytest.FixtureRequest,
                                                  tmp_path: Path) -> None:
    if case == "contrastive":
        recipe, overrides = request.getfixturevalue("contrastive_recipe"), []
    else:
        recipe, overrides = f"{case}-tiny", [*tiny_overrides(case, request), "train.precision=bf16"]
    per_rank = spawn_ranks(_count_steps, recipe, overrides, str(tmp_path / "run"))
    for rank, counts in enumerate(per_rank):
        print(f"{case} rank {rank}: DeepSpeed's host reads in 3 steps: {counts['deepspeed']}")
        assert counts["mmssl"] == {}, f"rank {rank} waits for the device in a training step: {counts['mmssl']}"

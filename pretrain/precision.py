"""Precision as one axis of a run: ``train.precision`` = ``fp32`` or ``bf16``, on every tower, objective and ZeRO stage.

**bf16** is DeepSpeed's bf16 mode (``"bf16": {"enabled": true}``): the engine casts every parameter to bfloat16 and
keeps an fp32 master copy of the trainable ones in its optimizer; buffers keep their dtype (DeepSpeed 0.19). Around
that, mmssl keeps what is numerically delicate in fp32:

* **Gradients accumulate and are reduced in fp32**: ``data_types.grad_accum_dtype = fp32`` and
  ``communication_data_type = fp32`` (the gradient cache runs k+1 backward passes into the same buffers per step;
  summed in bf16, each addition would round to 8 significant bits). DeepSpeed offers fp32 accumulation with ZeRO
  stages 1-3 only; without ZeRO it accumulates in the parameters' dtype, so ``zero_stage: 0`` in bf16 is refused for
  ``grad_accum > 1`` (one backward per step, reduced in fp32, is allowed).
* **Batch normalisation** runs on bf16 activations with fp32 affine parameters and fp32 running statistics
  (`prepare_for_precision`): the mixed form ``F.batch_norm`` and cuDNN accept, where DeepSpeed's cast alone would
  hand it a bf16 weight beside fp32 statistics ("expected scalar type BFloat16 but found Float"). The running
  statistics are an exponential average that bf16 could not hold (an update of 0.1·(v - r) vanishes under bf16's
  0.4 % resolution when v is within 4 % of r). Frozen batch norms that keep everything in buffers
  (torchvision's / timm's ``FrozenBatchNorm2d``) return the input's dtype.
* Objectives: logit scales are exponentiated in fp32 (`objectives.base.logit_scale`), losses are computed on fp32
  logits, EMA teachers keep fp32 masters, queues, codebooks and cluster state are fp32 buffers.
* Frozen weights are digested in the compute dtype (`pretrain.frozen`), so a bf16 resume finds the weights it
  saved.

**fp16** is refused on every device, with the reason: it needs dynamic loss scaling, which mmssl does not implement;
GPUs without bf16 (V100, T4) train in fp32.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch import nn

from mmssl.pretrain.recipe import RecipeError, TrainConfig

PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LOW_PRECISION = (torch.bfloat16, torch.float16)
FP16_REFUSAL = ("fp16 needs dynamic loss scaling, which mmssl does not implement; use bf16 (GPUs from Ampere on, "
                "CPUs) or fp32 (older GPUs such as V100 and T4)")


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of parameters and activations under ``train.precision``."""
    return DTYPES[precision]


def input_dtype(precision: str) -> torch.dtype | None:
    """What floating batch inputs are cast to before the forward (None: left as the loader made them)."""
    return None if precision == "fp32" else DTYPES[precision]


def check_attention_kernel(train: TrainConfig) -> None:
    if train.attention_kernel not in ATTENTION_KERNELS:
        raise RecipeError(f"train.attention_kernel must be one of {list(ATTENTION_KERNELS)}, "
                          f"got {train.attention_kernel!r}")


def check_precision(train: TrainConfig) -> None:
    """Refuse precisions and combinations the engine cannot train as documented above, naming the recipe key."""
    if train.precision not in PRECISIONS:
        hint = f" ({FP16_REFUSAL})" if train.precision == "fp16" else ""
        raise RecipeError(f"train.precision must be one of {PRECISIONS}, got {train.precision!r}{hint}")
    if train.precision == "bf16" and train.zero_stage == 0 and train.grad_accum > 1:
        raise RecipeError(f"train.zero_stage=0 with train.precision=bf16 and train.grad_accum={train.grad_accum}: "
                          "without ZeRO DeepSpeed accumulates gradients in bf16; use train.zero_stage=1 (or higher), "
                          "which accumulates them in fp32")


def deepspeed_precision(train: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config keys of ``train.precision`` (merged into the engine config)."""
    if train.precision == "fp32":
        return {"bf16": {"enabled": False}}
    config: dict[str, Any] = {"bf16": {"enabled": True}, "communication_data_type": "fp32"}
    if train.zero_stage > 0:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def configure_numerics(train: TrainConfig, device: torch.device) -> bool:
    """Set the process's determinism and matmul precision for the run; returns whether it is deterministic.

    ``train.deterministic`` unset means on for CPU runs (the resume and equivalence guarantees hold bit for bit)
    and off on CUDA, where determinism costs speed (no cuDNN autotuning, deterministic reductions). When not
    deterministic on CUDA, fp32 matmuls and convolutions use TF32 (10-bit mantissa products, fp32 accumulation):
    what bf16 runs do anyway for their fp32 parts, and what open_clip and timm enable by default."""
    deterministic = train.deterministic if train.deterministic is not None else device.type != "cuda"
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also NaN-fills every torch.empty; nothing here reads uninitialised memory, and
        # the fill costs a pass over every buffer DeepSpeed allocates.
        torch.utils.deterministic.fill_uninitialized_memory = False
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic
    return deterministic


ATTENTION_KERNELS = ("auto", "torch", "math", "flash", "efficient")


def attention_backends(train: TrainConfig, device: torch.device) -> list[Any] | None:
    """The ``torch.nn.attention.sdpa_kernel`` backends the run's attention may use (``train.attention_kernel``), or
    None for torch's own choice (``torch``).

    ``auto`` (default) is torch's choice except on the CPU in bf16, where it is the math path (``matmul, softmax,
    matmul``, differentiated by autograd): there torch's fused flash kernel runs its bf16 backward several times
    slower than the math path (measured with torch 2.14 on AVX-512 at CLIP's shapes, 65 and 24 tokens x 64-d heads:
    2.8x and 3.8x per forward + backward, docs/performance.md), while on CUDA and in fp32 the fused kernels win."""
    from torch.nn.attention import SDPBackend

    choice = train.attention_kernel
    if choice == "auto":
        choice = "math" if device.type == "cpu" and train.precision == "bf16" else "torch"
    named = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    return [named[choice]] if choice in named else None


# ---------------------------------------------------------------------------------------------- batch norm
class _MixedPrecisionNorm:
    """Mixin for batch-norm classes: low-precision affine parameters are handed to the norm as fp32 for the call
    (autograd takes their gradient back to the low-precision copies), and the result has the input's dtype."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        params = self._parameters  # type: ignore[attr-defined]
        low = {k: p for k, p in params.items() if p is not None and p.dtype in LOW_PRECISION}
        try:
            params.update({k: p.float() for k, p in low.items()})
            out = super().forward(x, *args, **kwargs)  # type: ignore[misc]
        finally:
            params.update(low)
        return out.to(x.dtype) if out.is_floating_point() and out.dtype != x.dtype else out


@cache
def _mixed_class(cls: type[nn.Module]) -> type[nn.Module]:
    return type(cls.__name__, (_MixedPrecisionNorm, cls), {"__module__": cls.__module__,
                                                            "__doc__": cls.__doc__})


def is_batch_norm(module: nn.Module) -> bool:
    """Batch norms of torch (``_BatchNorm``, ``SyncBatchNorm``), timm (``BatchNormAct2d``) and the frozen variants
    that hold their statistics in buffers (``FrozenBatchNorm2d``)."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return True
    buffers = dict(module.named_buffers(recurse=False))
    return "running_mean" in buffers and "running_var" in buffers


def prepare_for_precision(module: nn.Module) -> int:
    """Make every batch norm under ``module`` run in the mixed form (see the module docstring); returns how many.

    The instances keep their identity, parameters, buffers and state-dict names: only their class becomes a
    subclass of their own with the mixed-precision ``forward`` (the way ``torch.nn.utils.parametrize`` swaps a
    module's class). In fp32 the subclass does exactly what the original does. Idempotent."""
    count = 0
    for sub in module.modules():
        if is_batch_norm(sub) and not isinstance(sub, _MixedPrecisionNorm):
            sub.__class__ = _mixed_class(type(sub))
            count += 1
    return count

"""Where and how the evaluation computes: device, batch size, decoding workers, precision, progress bars.

One `Runtime` travels from the CLI (`add_runtime_options`: ``--device``, ``--batch-size``, ``--workers``,
``--precision``, ``--quiet``) to the feature extractor (`tools.evaluation.features`), the zero-shot text encoder and
the probe's mini-batch solver (`tools.evaluation.probe_minibatch`).

* ``device``: ``cpu``, ``cuda`` or ``cuda:N``; default ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``.
* ``precision``: ``fp32`` (default) or ``bf16``: the forward passes run under ``torch.autocast(device_type,
  torch.bfloat16)`` and features are stored in float32. Meant for GPUs; on a CPU it is accepted (PyTorch's CPU
  autocast supports bf16) so the path can be checked anywhere, but it is usually slower than fp32 there, and it
  changes the features (about 1e-2 relative), so bf16 and fp32 features are cached apart.
* ``workers``: decoding processes (`tools.evaluation.parallel`); 0 or 1 decode in this process. The samples, their
  order, the batches and the data-error counts are the same for any value.
* progress bars (tqdm, on stderr) show only when stderr is a terminal and ``--quiet`` is not given.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from mmssl.tools.errors import ToolError

PRECISIONS = ("fp32", "bf16")
T = TypeVar("T")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(text: str | None, where: str = "--device") -> torch.device:
    """``cpu`` / ``cuda`` / ``cuda:N`` (None: `default_device`), checked against what this machine has."""
    text = text or default_device()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ToolError(f"{where} {text!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ToolError(f"{where} {text!r}: the evaluation runs on cpu or cuda devices")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ToolError(f"{where} {text!r}: no CUDA device is available here (torch.cuda.is_available() is "
                            f"False, torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ToolError(f"{where} {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclass(frozen=True)
class Runtime:
    """How feature extraction and the device-side solvers run (see the module docstring)."""

    device: torch.device = field(default_factory=lambda: torch.device(default_device()))
    batch_size: int = 64
    workers: int = 0
    precision: str = "fp32"
    progress: bool = True  # bars still show only on a terminal

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ToolError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ToolError(f"--workers must be >= 0, got {self.workers}")
        if self.precision not in PRECISIONS:
            raise ToolError(f"--precision must be one of {list(PRECISIONS)}, got {self.precision!r}")

    @classmethod
    def from_options(cls, device: str | None = None, batch_size: int = 64, workers: int = 0,
                     precision: str = "fp32", quiet: bool = False) -> Runtime:
        return cls(resolve_device(device), batch_size, workers, precision, not quiet)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Runtime:
        return cls.from_options(args.device, args.batch_size, args.workers, args.precision, args.quiet)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on the device when ``precision == "bf16"``, else nothing."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def cache_tag(self) -> tuple[str, str, int]:
        """What of the runtime can change the features (so it keys the feature cache): the device type, the
        precision and the batch size (batched kernels may round differently); never the worker count."""
        return self.device.type, self.precision, self.batch_size


class Progress:
    """A tqdm bar on stderr that counts ``update(n)`` calls, or nothing when stderr is not a terminal or the
    runtime is quiet."""

    def __init__(self, runtime: Runtime | None, desc: str, total: int | None = None, unit: str = "samples") -> None:
        from tqdm import tqdm

        shown = (runtime is None or runtime.progress) and sys.stderr.isatty()
        self.bar: Any = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True) if shown else None

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_over(items: Iterable[T], runtime: Runtime | None, desc: str, total: int | None = None,
                  unit: str = "it") -> Iterator[T]:
    """``items`` with a `Progress` bar advancing one per item."""
    with Progress(runtime, desc, total, unit) as bar:
        for item in items:
            yield item
            bar.update()


def add_runtime_options(parser: argparse.ArgumentParser, *, batch_size: int = 64) -> None:
    """``--device``, ``--batch-size``, ``--workers``, ``--precision``, ``--quiet`` on an evaluation command."""
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"samples per forward pass of feature extraction (default {batch_size})")
    parser.add_argument("--workers", type=int, default=0,
                        help="decoding processes (0: decode in this process); results do not depend on it")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                        help="bf16: forward passes under bf16 autocast (meant for GPUs; features stored in fp32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (they show only on a terminal)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute features instead of reading <model>/feature_cache")


def add_probe_solver_option(parser: argparse.ArgumentParser) -> None:
    """``--probe-solver`` (`tools.evaluation.probe.SOLVERS`)."""
    parser.add_argument("--probe-solver", default="auto", choices=["auto", "lbfgs", "minibatch"],
                        help="linear probe solver: lbfgs (full batch, float64, host), minibatch (Adam + streamed "
                             "L-BFGS on --device, memory bounded by the batch); auto: minibatch when N*D > 2^26")

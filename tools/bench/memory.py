"""Peak tensor memory of a region of code, on any device.

On CUDA, `PeakMemory` reads the caching allocator's own counters (``torch.cuda.max_memory_allocated``). On CPU,
where torch keeps no such counter, it observes every tensor produced by an operator inside the region (a
``TorchDispatchMode``, which autograd's backward ops also pass through) and adds up the bytes of the storages that
are still alive, sweeping the ones that died: the peak of that sum is the region's peak *additional* tensor
memory (inputs and parameters that existed before the region are not counted, their gradients are).
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _Tracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.bytes = 0
        self.peak = 0

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.bytes -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self.live:
                continue
            self.live[key] = (StorageWeakRef(storage), size)
            self.bytes += size
        self.peak = max(self.peak, self.bytes)
        return out


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_mb``: the region's peak additional tensor memory."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._tracker: _Tracker | None = None
        self._base = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._tracker = _Tracker()
            self._tracker.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            assert self._tracker is not None
            self._tracker.__exit__(exc_type, exc, tb)
            self.peak_bytes = self._tracker.peak

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

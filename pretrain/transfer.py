"""Batches from the loader to the device: cast to the compute dtype and, on CUDA, one batch ahead.

`DeviceFeed` wraps the loader's iterator. Each ``next()`` returns ``(host_batch, device_batch)``: the host batch
for the trainer's accounting (its index, stream position, faults and keys), the device batch for the step. Floating
inputs are cast to the compute dtype on the device (so the host-to-device copy moves the loader's dtype, and
integer pixels move as uint8: `data_pipelines.batch.Batch.to`, then ``transforms`` finish them there: the
plug-ins' device transforms, `pretrain.data.device_transforms`). On CUDA the copy of the next batch is issued on a
side stream as soon as the current one is handed out, so it overlaps the current step's compute; the step's stream
waits for it before use (``wait_stream``) and the tensors are marked as used there (``record_stream``) so the
allocator does not reuse their memory early. On the CPU there is nothing to overlap: batches are moved on demand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

from mmssl.data_pipelines.batch import Batch


class DeviceFeed:
    def __init__(self, source: Iterator[Batch], device: torch.device, float_dtype: torch.dtype | None,
                 transforms: Mapping[str, Callable[[Tensor], Tensor]] | None = None) -> None:
        self.source, self.device, self.float_dtype = source, device, float_dtype
        self.transforms = dict(transforms or {})
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead: tuple[Batch, Batch] | None = None

    def __iter__(self) -> DeviceFeed:
        return self

    def _move(self, host: Batch) -> Batch:
        batch = host.to(self.device, float_dtype=self.float_dtype, non_blocking=True)
        for key, finish in self.transforms.items():
            if key in batch.inputs:
                x = finish(batch.inputs[key])  # type: ignore[arg-type]
                batch.inputs[key] = x.to(self.float_dtype) if self.float_dtype is not None else x
        return batch

    def _issue(self) -> tuple[Batch, Batch] | None:
        """Take the next host batch and start its copy on the side stream (CUDA)."""
        try:
            host = next(self.source)
        except StopIteration:
            return None
        assert self.stream is not None
        with torch.cuda.stream(self.stream):
            return host, self._move(host)

    def __next__(self) -> tuple[Batch, Batch]:
        if self.stream is None:
            host = next(self.source)
            return host, self._move(host)
        current = self.ahead if self.ahead is not None else self._issue()
        if current is None:
            raise StopIteration
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for t in current[1].tensors():
            t.record_stream(torch.cuda.current_stream(self.device))
        self.ahead = self._issue()
        return current

"""Batches from the loader to the device: cast to the compute dtype and, on CUDA, one batch ahead.

`DeviceFeed` wraps the loader's iterator. Each ``next()`` returns ``(host_batch, device_batch)``: the host batch
for the trainer's accounting (its index, stream position, faults and keys), the device batch for the step. Floating
inputs are cast to the compute dtype on the device (so the host-to-device copy moves the loader's dtype, and
integer pixels move as uint8: `data_pipelines.batch.Batch.to`, then ``transforms`` finish them there: the
plug-ins' device transforms, `pretrain.data.device_transforms`). On CUDA the copy of the next batch is issued on a
side stream as soon as the current one is handed out, so it overlaps the current step's compute; the step's stream
waits for it before use (``wait_stream``) and the tensors are marked as used there (``record_stream``) so the
allocator does not reuse their memory early. On the CPU there is nothing to overlap: batches are moved on demand.

Before the copy, ``trim`` may cut the host batch's text padding (`data_pipelines.batch.trim_padding`, for the
modalities `trimmed_modalities` allows), so the towers run on each batch's longest caption instead of ``max_len``;
the returned host batch is the trimmed one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from mmssl.data_pipelines.batch import Batch, trim_padding
from mmssl.objectives.base import Objective, base_modality


def trimmed_modalities(modalities: Iterable[str], objectives: Iterable[Objective], *, enabled: bool,
                       grad_accum: int, cached: bool) -> tuple[str, ...]:
    """The modalities whose padding the feed may cut (``data.trim_padding``): every one the model reads, except

    * one an objective masks (``Requirements.needs_masked_view``: its mask is drawn over the padded length, so a
      cut would change which tokens are drawn, and differently on 1 and 2 ranks);
    * all of them under the gradient cache with ``grad_accum > 1`` (its micro-batches' outputs are concatenated,
      so they must share one length)."""
    if not enabled or (cached and grad_accum > 1):
        return ()
    masked = {base_modality(m) for o in objectives for m in o.requires.needs_masked_view}
    return tuple(m for m in modalities if base_modality(m) not in masked)


class DeviceFeed:
    def __init__(self, source: Iterator[Batch], device: torch.device, float_dtype: torch.dtype | None,
                 transforms: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
                 trim: Sequence[str] = ()) -> None:
        self.source, self.device, self.float_dtype = source, device, float_dtype
        self.transforms = dict(transforms or {})
        self.trim = tuple(trim)
        self.positions: dict[str, list[int]] = {}  # trimmed modality -> [token positions kept, positions loaded]
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead: tuple[Batch, Batch] | None = None

    def __iter__(self) -> DeviceFeed:
        return self

    def take(self, host: Batch) -> tuple[Batch, Batch]:
        """``(host, device batch)`` for one loader batch: its padding cut (``trim``), then moved and finished."""
        if self.trim:
            cut = trim_padding(host, self.trim)
            for m in self.trim:
                if isinstance(host.inputs.get(m), Mapping) and "attention_mask" in host.inputs[m]:  # type: ignore[operator]
                    count = self.positions.setdefault(m, [0, 0])
                    count[0] += cut.inputs[m]["attention_mask"].numel()  # type: ignore[index]
                    count[1] += host.inputs[m]["attention_mask"].numel()  # type: ignore[index]
            host = cut
        return host, self._move(host)

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
            return self.take(host)

    def __next__(self) -> tuple[Batch, Batch]:
        if self.stream is None:
            return self.take(next(self.source))
        current = self.ahead if self.ahead is not None else self._issue()
        if current is None:
            raise StopIteration
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for t in current[1].tensors():
            t.record_stream(torch.cuda.current_stream(self.device))
        self.ahead = self._issue()
        return current

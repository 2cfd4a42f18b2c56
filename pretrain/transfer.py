"""Batches from the loader to the device: cast to the compute dtype and, on CUDA, one batch ahead.

`DeviceFeed` wraps the loader's iterator. Each ``next()`` returns ``(host_batch, device_batch)``: the host batch
for the trainer's accounting (its index, stream position, faults and keys), the device batch for the step. Floating
inputs are cast to the compute dtype on the device (so the host-to-device copy moves the loader's dtype, and
integer pixels move as uint8: `data_pipelines.batch.Batch.to`, then ``transforms`` finish them there: the
plug-ins' device transforms, `pretrain.data.device_transforms`). On CUDA the copy of the next batch is issued on a
side stream as soon as the current one is handed out, so it overlaps the current step's compute; the step's stream
waits for it before use (``wait_stream``) and the tensors are marked as used there (``record_stream``) so the
allocator does not reuse their memory early. On the CPU there is nothing to overlap: batches are moved on demand.

Before the copy, ``trim`` may cut the host batches' text padding (`data_pipelines.batch.trim_padding`, for the
modalities `trimmed_modalities` allows), so the towers run on each batch's longest caption instead of ``max_len``;
the returned host batch is the cut one. With ``group = k`` the feed takes ``k`` loader batches at a time (one
optimizer step's micro-batches under the gradient cache) and cuts them to one common length, since the gradient
cache concatenates their outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from mmssl.data_pipelines.batch import Batch, trim_padding
from mmssl.objectives.base import Objective, base_modality


def trimmed_modalities(modalities: Iterable[str], objectives: Iterable[Objective], *,
                       enabled: bool) -> tuple[str, ...]:
    """The modalities whose padding the feed may cut (``data.trim_padding``): every one the model reads, except one
    an objective masks (``Requirements.needs_masked_view``: its mask is drawn over the padded length, so a cut would
    change which tokens are drawn, and differently on 1 and 2 ranks)."""
    if not enabled:
        return ()
    masked = {base_modality(m) for o in objectives for m in o.requires.needs_masked_view}
    return tuple(m for m in modalities if base_modality(m) not in masked)


class DeviceFeed:
    def __init__(self, source: Iterator[Batch], device: torch.device, float_dtype: torch.dtype | None,
                 transforms: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
                 trim: Sequence[str] = (), group: int = 1) -> None:
        self.source, self.device, self.float_dtype = source, device, float_dtype
        self.transforms = dict(transforms or {})
        self.trim, self.group = tuple(trim), max(1, group)
        self.positions: dict[str, list[int]] = {}  # trimmed modality -> [token positions kept, positions loaded]
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ready: list[tuple[Batch, Batch]] = []  # moved, not handed out yet (in order)
        self.ahead: list[tuple[Batch, Batch]] | None = None  # CUDA: the next group, its copy issued

    def __iter__(self) -> DeviceFeed:
        return self

    def take(self, hosts: Sequence[Batch]) -> list[tuple[Batch, Batch]]:
        """``(host, device batch)`` for loader batches taken together: their padding cut to one length (``trim``),
        then moved and finished."""
        if self.trim:
            cut = trim_padding(hosts, self.trim)
            for host, short in zip(hosts, cut, strict=True):
                for m in self.trim:
                    value = host.inputs.get(m)
                    if isinstance(value, Mapping) and "attention_mask" in value:
                        count = self.positions.setdefault(m, [0, 0])
                        count[0] += short.inputs[m]["attention_mask"].numel()  # type: ignore[index]
                        count[1] += value["attention_mask"].numel()
            hosts = cut
        return [(host, self._move(host)) for host in hosts]

    def _move(self, host: Batch) -> Batch:
        batch = host.to(self.device, float_dtype=self.float_dtype, non_blocking=True)
        for key, finish in self.transforms.items():
            if key in batch.inputs:
                x = finish(batch.inputs[key])  # type: ignore[arg-type]
                batch.inputs[key] = x.to(self.float_dtype) if self.float_dtype is not None else x
        return batch

    def _pull(self) -> list[Batch]:
        """Up to ``group`` host batches (fewer at the end of the source)."""
        hosts: list[Batch] = []
        for _ in range(self.group):
            try:
                hosts.append(next(self.source))
            except StopIteration:
                break
        return hosts

    def _issue(self) -> list[tuple[Batch, Batch]]:
        """Take the next group and start its copy on the side stream (CUDA)."""
        hosts = self._pull()
        assert self.stream is not None
        with torch.cuda.stream(self.stream):
            return self.take(hosts) if hosts else []

    def __next__(self) -> tuple[Batch, Batch]:
        if self.stream is None:
            if not self.ready:
                self.ready = self.take(hosts) if (hosts := self._pull()) else []
            if not self.ready:
                raise StopIteration
            return self.ready.pop(0)
        if not self.ready:
            self.ready = self.ahead if self.ahead is not None else self._issue()
            if not self.ready:
                raise StopIteration
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            for _, moved in self.ready:
                for t in moved.tensors():
                    t.record_stream(torch.cuda.current_stream(self.device))
            self.ahead = self._issue()
        return self.ready.pop(0)

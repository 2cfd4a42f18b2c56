"""The CPU peak-memory tracker used by the benchmarks counts exactly the tensor storages alive at once."""

from __future__ import annotations

import torch

from mmssl.tools.bench.memory import PeakMemory


def test_peak_counts_live_storages_and_forgets_freed_ones() -> None:
    base = torch.ones(1 << 20)  # 4 MiB, allocated before the region: not counted
    with PeakMemory() as mem:
        y = base * 2  # +4 MiB
        view = y[:10]  # a view shares y's storage: +0
        del y
        z = base + 1  # view keeps y's storage alive: 8 MiB live
        del view, z
        w = torch.empty(1 << 19)  # 2 MiB after both were freed
        del w
    assert mem.peak_bytes == 8 * 2**20


def test_backward_temporaries_are_counted() -> None:
    a = torch.randn(512, 64, requires_grad=True)
    with PeakMemory() as mem:
        (a @ a.T).sum().backward()
    assert mem.peak_bytes >= 512 * 512 * 4  # the 512x512 product at least

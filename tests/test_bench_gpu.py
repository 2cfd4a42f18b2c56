"""`mmssl bench gpu` without a GPU: it says so in one line and exits 0 (the check itself runs only on CUDA; its
``--cpu`` dry run exercises every part at a small size and is left to `mmssl bench gpu --cpu` by hand)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import mmssl_in_process


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_gpu_check_without_cuda_says_so_and_exits_0() -> None:
    done = mmssl_in_process("bench", "gpu")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("mmssl bench gpu: no CUDA device here (torch.cuda.is_available() is False); the "
                                   "GPU check needs one. Nothing was run.")

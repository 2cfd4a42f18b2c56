"""A FIFO queue of past embeddings shared by every rank (MoCo, He et al. 2020; ALBEF, Li et al. 2021).

`FeatureQueue` holds ``K`` rows of width ``E`` (``feats``), the write pointer ``ptr``, the number of rows written so
far capped at ``K`` (``filled``) and, per row, an int64 id of the sample it came from (``ids``, ``-1`` when
unknown). All four are registered buffers, so they are part of the owning module's ``state_dict`` and survive a
DeepSpeed checkpoint / resume. (DeepSpeed's bf16 mode casts parameters only, so ``feats`` stays float32.)

``enqueue(x)`` gathers ``x`` from every rank in rank order (``gather_no_grad``), keeps the rows marked ``valid``
and writes them at ``ptr``, wrapping around: row ``r`` of the kept rows goes to slot ``(ptr + r) mod K`` and
``ptr ← (ptr + n) mod K``. Because every rank writes the same gathered rows, every rank holds the identical queue.
Wrap-around means ``K`` need not be a multiple of the global batch (MoCo's pointer arithmetic requires it) and the
number of rows written per call may vary (absent rows are not written). When more than ``K`` rows arrive at once,
only the last ``K`` are kept, as if written one after the other.

Until the queue has wrapped once, the written rows are exactly slots ``0 .. filled-1``; `mask()` marks them, and
unwritten slots must never be used as negatives.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmssl.objectives.distributed import gather_no_grad
from mmssl.objectives.ids import UNKNOWN_ID


class FeatureQueue(nn.Module):
    """``K x E`` FIFO of embeddings plus sample ids; see the module docstring."""

    feats: Tensor
    ids: Tensor
    ptr: Tensor
    filled: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 0 or dim < 1:
            raise ValueError(f"FeatureQueue needs size >= 0 and dim >= 1, got size={size}, dim={dim}")
        self.register_buffer("feats", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), UNKNOWN_ID, dtype=torch.int64))
        # shape [1], not []: collectives and some checkpoint tools mishandle 0-dim tensors
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("filled", torch.zeros(1, dtype=torch.int64))

    @property
    def size(self) -> int:
        return self.feats.shape[0]

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.feats.shape[1]}"

    def mask(self) -> Tensor:
        """``bool[K]``: slots holding a written row."""
        return torch.arange(self.size, device=self.feats.device) < self.filled

    def ordered(self) -> tuple[Tensor, Tensor]:
        """The written rows and their ids, oldest first (for inspection and tests)."""
        n, ptr = int(self.filled), int(self.ptr)
        if n < self.size:
            return self.feats[:n], self.ids[:n]
        return self.feats.roll(-ptr, 0), self.ids.roll(-ptr, 0)

    @torch.no_grad()
    def enqueue(self, x: Tensor, ids: Tensor | None = None, valid: Tensor | None = None, *,
                gather: bool = True) -> None:
        """Append the rows of ``x`` (``[B, E]``; ``ids``: int64 ``[B]``; ``valid``: bool ``[B]``, rows to write).

        With ``gather`` the three are first concatenated over ranks (every rank must pass the same ``B``, and
        every rank must call); pass ``gather=False`` when they already are the global batch.
        """
        if self.size == 0:
            return
        x = x.detach()
        rows = x.shape[0]
        ids = ids.to(device=x.device, dtype=torch.int64) if ids is not None else x.new_full((rows,), UNKNOWN_ID,
                                                                                          dtype=torch.int64)
        valid = valid.to(device=x.device, dtype=torch.bool) if valid is not None else x.new_ones(rows,
                                                                                             dtype=torch.bool)
        if gather:
            x, ids, valid = gather_no_grad(x.contiguous()), gather_no_grad(ids), gather_no_grad(valid)
        if x.shape[0] > self.size:
            self._enqueue_overflowing(x, ids, valid)
        else:
            self._enqueue_in_place(x, ids, valid)

    def _enqueue_in_place(self, x: Tensor, ids: Tensor, valid: Tensor) -> None:
        """``B <= K`` rows, on the device alone: the kept rows, moved to the front in order (stable argsort of
        ``~valid``), are written to slots ``ptr, ptr+1, ...``; the remaining ``B - n`` of those ``B`` distinct slots
        get their own current contents back; ``ptr`` and ``filled`` advance by ``n`` as tensors."""
        n = valid.sum()
        order = torch.argsort((~valid).to(torch.int8), stable=True)
        slots = (self.ptr + torch.arange(x.shape[0], device=self.feats.device)) % self.size
        write = (torch.arange(x.shape[0], device=self.feats.device) < n).unsqueeze(1)
        feats = torch.where(write, x[order].to(device=self.feats.device, dtype=self.feats.dtype), self.feats[slots])
        new_ids = torch.where(write.squeeze(1), ids[order].to(self.ids.device), self.ids[slots])
        self.feats.index_copy_(0, slots, feats)
        self.ids.index_copy_(0, slots, new_ids)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_((self.filled + n).clamp(max=self.size))

    def _enqueue_overflowing(self, x: Tensor, ids: Tensor, valid: Tensor) -> None:
        """More rows than slots (a queue smaller than the global batch): only the last ``K`` kept rows survive,
        where sequential writes would have put them. Reads the counts on the host."""
        keep = valid.nonzero().squeeze(1)
        x, ids = x[keep], ids[keep]
        n = x.shape[0]
        if n == 0:
            return
        ptr = int(self.ptr)
        if n > self.size:
            ptr = (ptr + n - self.size) % self.size
            x, ids = x[-self.size:], ids[-self.size:]
        slots = (ptr + torch.arange(x.shape[0], device=self.feats.device)) % self.size
        self.feats.index_copy_(0, slots, x.to(device=self.feats.device, dtype=self.feats.dtype))
        self.ids.index_copy_(0, slots, ids.to(self.ids.device))
        self.ptr.fill_((ptr + x.shape[0]) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n))

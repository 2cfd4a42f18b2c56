"""Masked prediction's objective-side helpers: per-sample generators, BERT's replacement, reading counts off host
masks, codebook targets, decoder positions, a row gather over ranks and the global token mean.

The masks themselves are the model's (`objectives.base.MultimodalModel.mask`: the modality plug-ins' generators,
with the one formula for how many of ``n`` tokens a ratio masks); objectives draw them from the host copy of the
batch (`host_input`) with one CPU generator per row seeded from ``(seed, batch index, sample key)`` (`row_generators`),
so a sample's mask does not depend on which rank or position it lands on, a resumed run draws exactly the masks an
uninterrupted one would have, and nothing waits for the device. Counts an objective needs (visible tokens, selected
slots) are read off those host masks (`host_row_counts`), never recomputed from a ratio.

* `bert_mask` (Devlin et al. 2019): the 80/10/10 replacement of the tokens the model's text mask selected (BERT's
  ``max(1, ⌊ratio·n + ½⌋)`` of the ``n`` real, non-special tokens): a selected token becomes ``[MASK]`` with
  probability ``replace_prob`` (0.8), a uniformly random non-special id with probability ``random_prob`` (0.1,
  which may equal the original, as in BERT), and stays as it is otherwise.
* `sincos_positions`: fixed sin-cos positions over a token grid for the MAE decoders: 2-D as MAE's (half the
  channels for the row, half for the column), 1-D over steps, and for ``(groups, rows, cols)`` tubelets the 2-D
  spatial code plus the 1-D code of the group (factorised, as the tubelet embedder's learned tables).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import torch
from torch import Tensor

from mmssl.objectives.distributed import sum_over_ranks, world
from mmssl.objectives.ids import to_device

Generators = torch.Generator | Sequence[torch.Generator]

# action codes of `TokenMask.action`
KEEP_UNSELECTED, MASKED, RANDOM, KEPT = 0, 1, 2, 3


def row_seed(seed: int, key: str, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}|{index}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def row_generators(seed: int, keys: Sequence[str], index: int = 0) -> list[torch.Generator]:
    """One CPU generator per row, seeded from ``(seed, batch index, sample key)``."""
    return [torch.Generator().manual_seed(row_seed(seed, k, index)) for k in keys]


def _per_row(generator: Generators, rows: int) -> list[torch.Generator]:
    if isinstance(generator, torch.Generator):
        return [generator] * rows
    gens = list(generator)
    if len(gens) != rows:
        raise ValueError(f"got {len(gens)} generators for {rows} rows")
    return gens


class TokenMask(NamedTuple):
    input_ids: Tensor  # [B, L] ids with the selected tokens replaced
    selected: Tensor  # bool [B, L]: positions to predict
    action: Tensor  # int8 [B, L]: 0 not selected, 1 -> [MASK], 2 -> random id, 3 kept


def bert_mask(input_ids: Tensor, selected: Tensor, *, special_ids: Iterable[int], mask_id: int, vocab_size: int,
              generator: Generators, replace_prob: float = 0.8, random_prob: float = 0.1,
              device: torch.device | str | None = None) -> TokenMask:
    """BERT's 80/10/10 replacement (module docstring) of the ``selected`` tokens (``bool[B, L]``, the model's text
    mask: never a special id or padding). Drawn on the CPU from the host ``input_ids`` / ``selected`` (so nothing is
    read back from a device), each row from its generator after the selection drew from it, and returned on
    ``device`` (default: the ids' device) by `to_device`."""
    device = input_ids.device if device is None else device
    ids, chosen_rows = on_host(input_ids), on_host(selected).bool()
    if chosen_rows.shape != ids.shape:
        raise ValueError(f"selection shape {list(chosen_rows.shape)} is not the ids' {list(ids.shape)}")
    specials = torch.tensor(sorted({int(s) for s in special_ids} | {int(mask_id)}), dtype=ids.dtype)
    vocab = torch.arange(vocab_size, dtype=ids.dtype)
    allowed = vocab[~torch.isin(vocab, specials)]
    out, action = ids.clone(), torch.zeros(ids.shape, dtype=torch.int8)
    for row, g in enumerate(_per_row(generator, ids.shape[0])):
        chosen = chosen_rows[row].nonzero().squeeze(1)
        k = chosen.numel()
        if k == 0:
            continue
        u = torch.rand(k, generator=g)
        random_ids = allowed[torch.randint(allowed.numel(), (k,), generator=g)]
        to_mask, to_random = u < replace_prob, (u >= replace_prob) & (u < replace_prob + random_prob)
        out[row, chosen[to_mask]] = mask_id
        out[row, chosen[to_random]] = random_ids[to_random]
        action[row, chosen] = torch.where(to_mask, MASKED, torch.where(to_random, RANDOM, KEPT)).to(torch.int8)
    return TokenMask(to_device(out, device), to_device(action > 0, device), to_device(action, device))


def host_input(batch: Any, modality: str) -> Any:
    """``batch.inputs[modality]`` as the host holds it: from ``batch.host`` (the batch before its move to the
    device), so masks drawn from it read nothing back from a device; the batch's own where it has no host copy."""
    host = getattr(batch, "host", None)
    return (host if host is not None else batch).inputs[modality]


def host_row_counts(mask: Tensor) -> tuple[int, int]:
    """``(fewest, most)`` True values in a row of the ``bool[B, T]`` ``mask``: read on the host (a mask the model
    drew from `host_input` is there already; a device mask is copied back, which waits for the device)."""
    counts = on_host(mask).bool().sum(1)
    if counts.numel() == 0:
        return 0, 0
    return int(counts.min()), int(counts.max())


def visible_slots(mask: Tensor, visible: int) -> Tensor:
    """``bool[B, visible]``: which of the ``visible`` slots a tower's drop mode fills with an unmasked token (each
    row's unmasked tokens in order, then filler where the row has fewer; `MultimodalModel.encode_masked`)."""
    kept = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :visible]
    return ~mask.gather(1, kept)


def selected_slots(selected: Tensor, slots: int) -> tuple[Tensor, Tensor]:
    """``(index long[B, S], used bool[B, S])``: the positions of each row's selected tokens in order, padded to
    ``S = slots`` (at least the most any row selects, `host_row_counts` of the host mask): a gather of ``S`` slots
    instead of ``x[selected]``, whose size the device would have to be asked for."""
    slots = min(slots, selected.shape[1])
    index = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :slots]
    return index, selected.gather(1, index)


def on_host(t: Tensor) -> Tensor:
    """``t`` detached on the CPU (a copy back from a device only when it is not there already)."""
    return t.detach() if t.device.type == "cpu" else t.detach().cpu()


def cluster_targets(patches: Tensor, codebook: Tensor) -> Tensor:
    """Masked cluster prediction's targets: ``argmin_k ||p - c_k||²`` for every patch ``[..., P]`` against the
    ``[K, P]`` codebook, in float64."""
    p, c = patches.double().flatten(0, -2), codebook.double()
    d = p.square().sum(-1, keepdim=True) - 2 * p @ c.T + c.square().sum(-1)[None]
    return d.argmin(-1).view(patches.shape[:-1])


def _sincos_1d(positions: Tensor, width: int) -> Tensor:
    """``[n, width]``: ``[sin(p·ω_k), cos(p·ω_k)]`` for ``ω_k = 10000^(-k/(width/2))``, ``k < width/2``."""
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width // 2))
    angles = positions.to(torch.float64)[:, None] * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


@lru_cache(maxsize=16)
def sincos_2d(grid: tuple[int, int], width: int) -> Tensor:
    """``[gh·gw, width]``: half the channels sin/cos of the row index, half of the column index (MAE-style, fixed)."""
    gh, gw = grid
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)[:, None] * omega
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)[:, None] * omega
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1).float()


@lru_cache(maxsize=16)
def sincos_positions(grid: tuple[int, ...], width: int) -> Tensor:
    """``[prod(grid), width]`` fixed positions of a row-major token grid (module docstring): ``(T,)`` 1-D,
    ``(gh, gw)`` `sincos_2d`, ``(G, gh, gw)`` the spatial `sincos_2d` plus the 1-D code of the group."""
    if len(grid) == 1:
        return _sincos_1d(torch.arange(grid[0]), width).float()
    if len(grid) == 2:
        return sincos_2d((grid[0], grid[1]), width)
    if len(grid) == 3:
        groups, gh, gw = grid
        spatial = sincos_2d((gh, gw), width).double().repeat(groups, 1)
        temporal = _sincos_1d(torch.arange(groups).repeat_interleave(gh * gw), width)
        return (spatial + temporal).float()
    raise ValueError(f"sin-cos positions for a grid of 1 to 3 axes, got {list(grid)}")


def presence(outputs: object, batch: object, modality: str, rows: int, device: torch.device) -> Tensor:
    """``bool[B]``: ``outputs.present[m]``, else ``batch.present[m]`` (a modality the main forward skipped)."""
    for source in (getattr(outputs, "present", None), getattr(batch, "present", None)):
        if source is not None and modality in source:
            return to_device(source[modality], device)
    return torch.ones(rows, dtype=torch.bool, device=device)


def upcast(t: Tensor) -> Tensor:
    """At least float32 (bf16 activations are upcast for the loss; float64 stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


def global_mean(total: Tensor, count: Tensor | int, enabled: bool = True) -> Tensor:
    """``total / count`` where, with ``enabled`` under data parallelism, ``count`` is summed over ranks and the
    result multiplied by the world size ``W``: ``L_r = W·total_r / Σ_k count_k``, so ``mean_r L_r`` — what
    gradient averaging optimises — is the mean over every rank's tokens, as on one process with the global batch.
    Every rank must call it (an all-reduce of the count)."""
    count_t = count.float() if isinstance(count, Tensor) else torch.full((), float(count), device=total.device)
    count_t = sum_over_ranks(count_t.to(total.device), enabled)
    size = world()[1] if enabled else 1
    return total * size / count_t.clamp_min(1.0)

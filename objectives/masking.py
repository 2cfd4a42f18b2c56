"""Mask generators for masked-prediction objectives, and their shared pieces: patch (un)folding, codebook
targets, 2-D sin-cos positions, a row gather over ranks and the global token mean.

Every generator takes either one seeded ``torch.Generator`` (used for the rows in order) or one generator per row
(`row_generators`), and produces its masks on the CPU. Objectives seed one generator per row from
``(seed, batch index, sample key)``, so a sample's mask does not depend on which rank or position it lands on, and a
resumed run draws exactly the masks an uninterrupted one would have.

* `bert_mask` (Devlin et al. 2019): per row, ``k = max(1, ⌊ratio·n + ½⌋)`` of the ``n`` maskable tokens (real, not
  a special id) are selected uniformly without replacement (BERT's ``create_pretraining_data`` count); a selected
  token becomes ``[MASK]`` with probability ``replace_prob`` (0.8), a uniformly random non-special id with
  probability ``random_prob`` (0.1, which may equal the original, as in BERT), and stays as it is otherwise.
* `random_patch_mask` (MAE, He et al. 2022): exactly ``N - ⌊N·(1-ratio)⌋`` of ``N`` patches per row (MAE's
  ``len_keep``), uniformly (argsort of uniform noise).
* `span_mask` (wav2vec 2.0, Baevski et al. 2020; HuBERT, Hsu et al. 2021): ``s = max(min_spans, ⌊p·T + ½⌋)``
  distinct start positions drawn from ``[0, T - L]``, each masking ``L`` consecutive steps (spans may overlap;
  fairseq's ``mask_prob`` is ``p·L``). `time_span_mask` applies it to the time (column) axis of a patch grid,
  masking whole columns, the AV-HuBERT / spectrogram form.
* `block_mask` (BEiT, Bao et al. 2022): rectangles of random area ``≥ min_block`` and aspect ratio in
  ``[1/max_aspect, max_aspect]`` (log-uniform) until at least ``⌊ratio·N + ½⌋`` patches are masked.

`patchify` follows MAE's ``patchify``: patches row-major over the ``(H/ph) x (W/pw)`` grid (the order of timm's
``patch_embed`` tokens), each flattened as ``(ph, pw, C)`` (channels last).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import NamedTuple

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


def bert_mask(input_ids: Tensor, attention_mask: Tensor, *, special_ids: Iterable[int], mask_id: int, vocab_size: int,
              generator: Generators, ratio: float = 0.15, replace_prob: float = 0.8,
              random_prob: float = 0.1, device: torch.device | str | None = None) -> TokenMask:
    """BERT's 80/10/10 token masking (module docstring); specials and padding are never selected. Drawn on the
    CPU from ``input_ids`` / ``attention_mask`` (pass the host batch's, so nothing is read back from a device)
    and returned on ``device`` (default: the ids' device) by `to_device`."""
    device = input_ids.device if device is None else device
    ids = on_host(input_ids)
    specials = torch.tensor(sorted({int(s) for s in special_ids} | {int(mask_id)}), dtype=ids.dtype)
    maskable = on_host(attention_mask).bool() & ~torch.isin(ids, specials)
    vocab = torch.arange(vocab_size, dtype=ids.dtype)
    allowed = vocab[~torch.isin(vocab, specials)]
    out, action = ids.clone(), torch.zeros(ids.shape, dtype=torch.int8)
    for row, g in enumerate(_per_row(generator, ids.shape[0])):
        where = maskable[row].nonzero().squeeze(1)
        n = where.numel()
        if n == 0:
            continue
        k = max(1, math.floor(ratio * n + 0.5))
        chosen = where[torch.randperm(n, generator=g)[:k]]
        u = torch.rand(k, generator=g)
        random_ids = allowed[torch.randint(allowed.numel(), (k,), generator=g)]
        to_mask, to_random = u < replace_prob, (u >= replace_prob) & (u < replace_prob + random_prob)
        out[row, chosen[to_mask]] = mask_id
        out[row, chosen[to_random]] = random_ids[to_random]
        action[row, chosen] = torch.where(to_mask, MASKED, torch.where(to_random, RANDOM, KEPT)).to(torch.int8)
    return TokenMask(to_device(out, device), to_device(action > 0, device), to_device(action, device))


def max_selected(ratio: float, length: int) -> int:
    """The most tokens `bert_mask` selects in a row of ``length`` (``k = max(1, ⌊ratio·n + ½⌋)``, ``n <= length``)."""
    return max(1, math.floor(ratio * length + 0.5))


def selected_slots(selected: Tensor, slots: int) -> tuple[Tensor, Tensor]:
    """``(index long[B, S], used bool[B, S])``: the positions of each row's selected tokens in order, padded to
    ``S = slots`` (at least the most any row selects): a fixed-shape gather instead of ``x[selected]``, whose
    shape depends on the data (so that nothing waits for the device)."""
    slots = min(slots, selected.shape[1])
    index = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :slots]
    return index, selected.gather(1, index)


def on_host(t: Tensor) -> Tensor:
    """``t`` detached on the CPU (a copy back from a device only when it is not there already)."""
    return t.detach() if t.device.type == "cpu" else t.detach().cpu()


def visible_patches(num_patches: int, ratio: float) -> int:
    """Patches `random_patch_mask` leaves visible in each row: ``⌊N·(1-ratio)⌋`` (MAE's ``len_keep``)."""
    return int(num_patches * (1 - ratio))


def random_patch_mask(rows: int, num_patches: int, ratio: float, generator: Generators) -> Tensor:
    """``bool[rows, N]``, True = masked, exactly ``N - ⌊N·(1-ratio)⌋`` per row."""
    n_mask = num_patches - visible_patches(num_patches, ratio)
    mask = torch.zeros(rows, num_patches, dtype=torch.bool)
    for row, g in enumerate(_per_row(generator, rows)):
        mask[row, torch.rand(num_patches, generator=g).argsort()[:n_mask]] = True
    return mask


def span_mask(rows: int, length: int, *, start_prob: float, span: int, generator: Generators,
              min_spans: int = 1) -> Tensor:
    """``bool[rows, T]``: ``max(min_spans, ⌊p·T + ½⌋)`` distinct starts in ``[0, T-L]``, each masking ``L`` steps."""
    span = min(span, length)
    positions = length - span + 1
    n_starts = min(positions, max(min_spans, math.floor(start_prob * length + 0.5)))
    mask = torch.zeros(rows, length, dtype=torch.bool)
    for row, g in enumerate(_per_row(generator, rows)):
        for s in torch.randperm(positions, generator=g)[:n_starts].tolist():
            mask[row, s : s + span] = True
    return mask


def time_span_mask(rows: int, grid: tuple[int, int], *, start_prob: float, span: int, generator: Generators,
                   min_spans: int = 1) -> Tensor:
    """`span_mask` over the columns (time) of a ``(gh, gw)`` patch grid, every row of a masked column masked;
    ``bool[rows, gh·gw]`` in patch order."""
    gh, gw = grid
    cols = span_mask(rows, gw, start_prob=start_prob, span=span, generator=generator, min_spans=min_spans)
    return cols.unsqueeze(1).expand(rows, gh, gw).reshape(rows, gh * gw)


def block_mask(rows: int, grid: tuple[int, int], ratio: float, generator: Generators, *, min_block: int = 4,
               max_aspect: float = 3.0) -> Tensor:
    """BEiT blockwise masking: ``bool[rows, gh·gw]`` with at least ``⌊ratio·N + ½⌋`` masked per row."""
    gh, gw = grid
    target = math.floor(ratio * gh * gw + 0.5)
    log_aspect = math.log(max_aspect)
    out = torch.zeros(rows, gh, gw, dtype=torch.bool)
    for row, g in enumerate(_per_row(generator, rows)):
        stalled = 0
        while int(out[row].sum()) < target and stalled < 20:
            area = min_block + float(torch.rand((), generator=g)) * max(0, target - min_block)
            aspect = math.exp((2 * float(torch.rand((), generator=g)) - 1) * log_aspect)
            h = min(gh, max(1, round(math.sqrt(area * aspect))))
            w = min(gw, max(1, round(math.sqrt(area / aspect))))
            top = int(torch.randint(gh - h + 1, (), generator=g))
            left = int(torch.randint(gw - w + 1, (), generator=g))
            before = int(out[row].sum())
            out[row, top : top + h, left : left + w] = True
            stalled = stalled + 1 if int(out[row].sum()) == before else 0
    return out.reshape(rows, gh * gw)


def patchify(x: Tensor, patch: tuple[int, int]) -> Tensor:
    """``[B, C, H, W] -> [B, (H/ph)·(W/pw), ph·pw·C]`` (MAE order: grid row-major, channels last)."""
    b, c, h, w = x.shape
    ph, pw = patch
    if h % ph or w % pw:
        raise ValueError(f"input {h}x{w} is not divisible into {ph}x{pw} patches")
    gh, gw = h // ph, w // pw
    return x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, ph * pw * c)


def unpatchify(patches: Tensor, patch: tuple[int, int], grid: tuple[int, int], channels: int) -> Tensor:
    """Inverse of `patchify`."""
    (ph, pw), (gh, gw) = patch, grid
    b = patches.shape[0]
    return patches.reshape(b, gh, gw, ph, pw, channels).permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * ph,
                                                                                             gw * pw)


def cluster_targets(patches: Tensor, codebook: Tensor) -> Tensor:
    """Masked cluster prediction's targets: ``argmin_k ||p - c_k||²`` for every patch ``[..., P]`` against the
    ``[K, P]`` codebook, in float64."""
    p, c = patches.double().flatten(0, -2), codebook.double()
    d = p.square().sum(-1, keepdim=True) - 2 * p @ c.T + c.square().sum(-1)[None]
    return d.argmin(-1).view(patches.shape[:-1])


@lru_cache(maxsize=16)
def sincos_2d(grid: tuple[int, int], width: int) -> Tensor:
    """``[gh·gw, width]``: half the channels sin/cos of the row index, half of the column index (MAE-style, fixed)."""
    gh, gw = grid
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)[:, None] * omega
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)[:, None] * omega
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1).float()


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

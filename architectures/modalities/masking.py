"""Token masks and per-token reconstruction targets: the one home of every mask generator and every patch layout
that masked prediction uses (the plug-ins' ``mask`` / ``target``, which objectives reach through the model's
``mask`` / ``target``). Masks are ``bool[B, T]``, True = masked, over the ``T`` tokens of the modality's masked view.

**How many of n tokens a ratio masks**: ``masked_count(ratio, n) = ⌊ratio·n + ½⌋``, ``ratio·n`` rounded to the
nearest integer (halves up), in every generator below and, through the masks they draw, in every objective that
counts visible tokens. Chosen over MAE's ``n - ⌊n·(1 - ratio)⌋`` (``len_keep = int(L·(1 - mask_ratio))``, i.e.
``⌈ratio·n⌉`` in exact arithmetic) because (1) the realised share is the one closest to the configured ratio,
within half a token either way, where MAE's ceiling masks up to one token more than asked; (2) it is BERT's count
(``round(len·masked_lm_prob)``, ties aside) and VideoMAE's per-frame count (``int(0.9·196) = 176``, where MAE's
formula gives 177); (3) it is stable under floating point: ``1 - ratio`` is inexact, so MAE's floor jumps by one
where ``n·(1 - ratio)`` should be an integer (``0.3`` of ``90`` masks 28 since ``90·(1 - 0.3) = 62.999…``, not
27), while ``⌊ratio·n + ½⌋`` can only move at exact halves. For MAE's own setting (0.75 of 14 x 14 = 196) and
every ``ratio·n`` that is an integer the two agree.

Generators:

* `random_token_mask` (MAE, He et al. 2022): per row, exactly ``k = masked_count(ratio, n)`` of the row's ``n``
  maskable tokens (all ``T`` tokens unless a ``maskable`` mask is given) are masked, chosen uniformly without
  replacement as the ``k`` smallest of i.i.d. uniform noise values (MAE's argsort of noise). ``min_count=1`` gives
  BERT's selection count ``max(1, k)`` (Devlin et al. 2019) for rows with a maskable token.
* `tube_mask` (VideoMAE, Tong et al. 2022): one `random_token_mask` over the ``S`` spatial positions, repeated over
  the ``G`` temporal groups, so the same spatial patches are hidden in every frame-group (token order: group-major,
  index ``g·S + s``).
* `span_mask` (wav2vec 2.0, Baevski et al. 2020; HuBERT, Hsu et al. 2021): per row of ``n`` (real) steps,
  ``s = max(min_spans, masked_count(p, n))`` distinct start positions drawn uniformly from ``[0, n - L]``, each
  masking ``L`` consecutive steps (spans may overlap; fairseq's ``mask_prob`` is ``p·L``). `time_span_mask` applies
  it to the time (column) axis of a patch grid, masking whole columns: the AV-HuBERT / spectrogram form.
* `block_mask` (BEiT, Bao et al. 2022): rectangles of random area ``≥ min_block`` and aspect ratio in
  ``[1/max_aspect, max_aspect]`` (log-uniform) until at least ``masked_count(ratio, N)`` patches are masked.

Randomness comes from ``generator``: one ``torch.Generator`` drawing the rows in order, a sequence of one generator
per row (a sample's mask then does not depend on its batch position, rank or world size), or None for torch's
global generator. Masks are drawn on the host (noise on the generator's device) and returned on ``device``; the
same generator state gives the same mask.

Targets (`patchify`, `tubeletify`) follow MAE's ``patchify``: tokens row-major over the grid (the order of timm's
``patch_embed`` tokens and of the plug-ins' embedders), each flattened channels last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mmssl.architectures.errors import ArchitectureError

Generators = torch.Generator | Sequence[torch.Generator] | None


def masked_count(ratio: float, n: int) -> int:
    """``⌊ratio·n + ½⌋``: how many of ``n`` tokens a mask ``ratio`` hides (module docstring)."""
    return math.floor(ratio * n + 0.5)


def check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise ArchitectureError(f"mask ratio must be in [0, 1], got {ratio}")


def _per_row(generator: Generators, rows: int) -> list[torch.Generator | None]:
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * rows
    gens = list(generator)
    if len(gens) != rows:
        raise ArchitectureError(f"got {len(gens)} mask generators for {rows} rows")
    return gens


def _on(mask: Tensor, device: torch.device | str | None) -> Tensor:
    return mask.to(device) if device is not None else mask


def uniform_noise(rows: int, length: int, generator: Generators) -> Tensor:
    """``[rows, length]`` uniform noise from ``generator`` (see the module docstring), on the CPU or the
    generator's device."""
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.rand(rows, length, generator=generator, device=device)
    gens = _per_row(generator, rows)
    return torch.stack([torch.rand(length, generator=g, device=g.device).cpu() for g in gens])


def random_token_mask(rows: int, length: int, ratio: float, generator: Generators, *,
                      maskable: Tensor | None = None, min_count: int = 0,
                      device: torch.device | str | None = None) -> Tensor:
    """``bool[rows, length]``: per row ``max(min_count, ⌊ratio·n + ½⌋)`` (at most ``n``) of its ``n`` maskable
    tokens masked, uniformly."""
    check_ratio(ratio)
    noise = uniform_noise(rows, length, generator)
    if maskable is None:
        allowed = torch.ones(rows, length, dtype=torch.bool)
    else:
        allowed = maskable.detach().to("cpu", torch.bool)
        if tuple(allowed.shape) != (rows, length):
            raise ArchitectureError(f"maskable shape {list(allowed.shape)} is not [{rows}, {length}]")
    noise = torch.where(allowed, noise.cpu(), torch.full_like(noise.cpu(), 2.0))  # not maskable: never drawn
    n = allowed.sum(1)
    counts = torch.tensor([min(int(c), max(min_count, masked_count(ratio, int(c))) if c else 0) for c in n])
    ranks = noise.argsort(1).argsort(1)
    return _on(ranks < counts[:, None], device)


def tube_mask(rows: int, groups: int, spatial: int, ratio: float, generator: Generators, *,
              device: torch.device | str | None = None) -> Tensor:
    """``bool[rows, groups·spatial]``: the same ``⌊ratio·S + ½⌋`` spatial positions masked in every temporal
    group."""
    spatial_mask = random_token_mask(rows, spatial, ratio, generator)
    return _on(spatial_mask.unsqueeze(1).expand(rows, groups, spatial).reshape(rows, groups * spatial), device)


def span_mask(rows: int, length: int, *, start_prob: float, span: int, generator: Generators,
              lengths: Sequence[int] | Tensor | None = None, min_spans: int = 1,
              device: torch.device | str | None = None) -> Tensor:
    """``bool[rows, length]``: in each row of ``n`` steps (``lengths[row]``, default ``length``: the real steps
    come first), ``max(min_spans, ⌊p·n + ½⌋)`` distinct starts in ``[0, n - L]`` (at most ``n - L + 1``), each
    masking ``L = min(span, n)`` steps; nothing in a row of ``n = 0``."""
    check_ratio(start_prob)
    if span < 1:
        raise ArchitectureError(f"mask span must be >= 1 step, got {span}")
    sizes = [length] * rows if lengths is None else [int(n) for n in lengths]
    if len(sizes) != rows or any(not 0 <= n <= length for n in sizes):
        raise ArchitectureError(f"span mask lengths {sizes} must be {rows} values in [0, {length}]")
    mask = torch.zeros(rows, length, dtype=torch.bool)
    for row, (g, n) in enumerate(zip(_per_row(generator, rows), sizes, strict=True)):
        if n == 0:
            continue
        steps = min(span, n)
        positions = n - steps + 1
        starts = min(positions, max(min_spans, masked_count(start_prob, n)))
        for s in torch.randperm(positions, generator=g)[:starts].tolist():
            mask[row, s : s + steps] = True
    return _on(mask, device)


def time_span_mask(rows: int, grid: tuple[int, int], *, start_prob: float, span: int, generator: Generators,
                   min_spans: int = 1, device: torch.device | str | None = None) -> Tensor:
    """`span_mask` over the columns (time) of a ``(gh, gw)`` patch grid, every row of a masked column masked;
    ``bool[rows, gh·gw]`` in patch order."""
    gh, gw = grid
    cols = span_mask(rows, gw, start_prob=start_prob, span=span, generator=generator, min_spans=min_spans)
    return _on(cols.unsqueeze(1).expand(rows, gh, gw).reshape(rows, gh * gw), device)


def block_mask(rows: int, grid: tuple[int, int], ratio: float, generator: Generators, *, min_block: int = 4,
               max_aspect: float = 3.0, device: torch.device | str | None = None) -> Tensor:
    """BEiT blockwise masking: ``bool[rows, gh·gw]`` with at least ``⌊ratio·N + ½⌋`` masked per row."""
    check_ratio(ratio)
    gh, gw = grid
    target = masked_count(ratio, gh * gw)
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
    return _on(out.reshape(rows, gh * gw), device)


def patchify(x: Tensor, patch: tuple[int, int]) -> Tensor:
    """``[B, C, H, W] -> [B, (H/ph)·(W/pw), ph·pw·C]`` (MAE order: grid row-major, channels last)."""
    b, c, h, w = x.shape
    ph, pw = patch
    if h % ph or w % pw:
        raise ArchitectureError(f"input {h}x{w} is not divisible into {ph}x{pw} patches")
    gh, gw = h // ph, w // pw
    return x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, ph * pw * c)


def unpatchify(patches: Tensor, patch: tuple[int, int], grid: tuple[int, int], channels: int) -> Tensor:
    """Inverse of `patchify`."""
    (ph, pw), (gh, gw) = patch, grid
    b = patches.shape[0]
    return patches.reshape(b, gh, gw, ph, pw, channels).permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * ph,
                                                                                             gw * pw)


def tubeletify(x: Tensor, tubelet: int, patch: tuple[int, int]) -> Tensor:
    """``[B, C, T, H, W] -> [B, G·gh·gw, tubelet·ph·pw·C]``: group-major, row-major patches, channels last."""
    b, c, t, h, w = x.shape
    ph, pw = patch
    if t % tubelet or h % ph or w % pw:
        raise ArchitectureError(f"video {t}x{h}x{w} is not divisible into {tubelet}x{ph}x{pw} tubelets")
    g, gh, gw = t // tubelet, h // ph, w // pw
    x = x.reshape(b, c, g, tubelet, gh, ph, gw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, g * gh * gw, tubelet * ph * pw * c)

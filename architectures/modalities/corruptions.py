"""Array-level input corruptions for robustness evaluation, one noise topology per modality.

MultiBench (Liang et al. 2021) evaluates a model on test data re-decoded with a corruption at increasing noise levels
and scores the curve of the metric against the level. Each modality has its own *noise topology* (blur and occlusion
for pixels, keyboard typos for typed text, dropped or noisy steps for time series). The functions here are the
corruptions themselves, on the array a decoder holds at the stage the corruption belongs to; the plug-ins bind them
to a level (``corrupted_decoder``). Every random draw comes from the ``numpy.random.Generator`` passed in, which the
stream seeds per sample key, so a corrupted evaluation is reproducible sample by sample. Strength 0 returns the input
unchanged (the same object or a bit-identical copy). Every function reads ``fn(x, strength, rng, **options)``;
`Bound` fixes the strength and options, giving the ``(x, rng) -> x`` callable a decoder applies (picklable, for
loader worker processes). ``⌊x⌉`` below is rounding to the nearest integer (Python's ``round``, halves to even).

Pixels (``[..., H, W]`` floats in ``[0, 1]``, after resizing, before normalisation):

* `gaussian_blur`: separable Gaussian, ``k(d) ∝ exp(-d² / 2σ²)`` for ``|d| ≤ ⌈3σ⌉``, edges replicated;
* `occlude`: one axis-aligned rectangle of ``⌊fraction·H·W⌉`` pixels (aspect ratio log-uniform in [1/2, 2], clipped to
  the image), uniformly placed, filled with ``fill`` (the plug-ins pass the normalisation mean: the filled pixels are
  exactly 0 after normalisation);
* `add_gaussian_noise`: ``x + std·ε``, ``ε ~ N(0, 1)`` per element, not clipped (so the added noise has exactly the
  stated standard deviation).

Text (a string, before tokenisation):

* `drop_words`: each whitespace-separated word is removed (with the whitespace after it) with probability ``p``;
* `keyboard_typos`: each letter or digit is, with probability ``p``, replaced by a QWERTY neighbour, swapped with the
  next character, or deleted (one of the three uniformly), the natural-noise model of Belinkov & Bisk 2018.

Waveforms (``[N]`` samples, before the log-mel):

* `add_noise_at_snr`: white Gaussian noise of power ``P_x / 10^(snr/10)`` (``P_x = mean(x²)``), so the
  signal-to-noise ratio is ``snr`` dB;
* `zero_chunks`: ``⌊fraction·N / chunk⌉`` of the ``⌈N / chunk⌉`` consecutive ``chunk``-sample chunks, chosen
  without replacement, set to 0.

Time series (``[T, C]``) and frames (``[T, ...]``):

* `zero_slices`: ``⌊fraction·n⌉`` of the ``n`` slices along an axis (time steps, or the columns of a tabular row),
  chosen without replacement, set to ``fill``;
* `add_channel_noise`: ``x_tc + scale·σ_c·ε_tc`` with ``σ_c`` the channel's standard deviation over the series;
* `drop_frames`: ``⌊fraction·(T-1)⌉`` of frames ``1..T-1`` (the first frame is always kept), chosen without
  replacement, each replaced by the last kept frame before it (a stalled video stream).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Bound:
    """``fn`` bound to a strength and options: ``Bound(fn, s, o)(x, rng) == fn(x, s, rng, **o)``."""

    fn: Callable[..., Any]
    strength: float
    options: dict[str, Any] = field(default_factory=dict)

    def __call__(self, x: Any, rng: np.random.Generator) -> Any:
        return self.fn(x, self.strength, rng, **self.options)


# ----------------------------------------------------------------------------------------------------------- pixels


def gaussian_kernel(sigma: float) -> Tensor:
    """The normalised 1-D Gaussian ``k(d) ∝ exp(-d² / 2σ²)``, ``|d| ≤ ⌈3σ⌉`` (float32)."""
    radius = max(1, math.ceil(3.0 * sigma))
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(d * d) / (2.0 * sigma * sigma))
    return (k / k.sum()).float()


def gaussian_blur(x: Tensor, sigma: float, rng: np.random.Generator | None = None) -> Tensor:
    """Blur the last two dims of ``x`` (``[..., H, W]``) by a separable Gaussian of std ``sigma`` pixels, with
    replicated edges (any ``sigma``, also wider than the image). ``sigma <= 0`` returns ``x``. Deterministic:
    ``rng`` is unused (it keeps the signature of the other corruptions)."""
    if sigma <= 0:
        return x
    k = gaussian_kernel(sigma).to(x.dtype)
    r = (k.numel() - 1) // 2
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-2], shape[-1])
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return flat.reshape(shape)


def occlusion_box(height: int, width: int, fraction: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a rectangle of about ``fraction·H·W`` pixels (within one row or column): aspect
    ratio ``w/h`` log-uniform in [1/2, 2], clipped to the image, uniformly placed."""
    area = fraction * height * width
    if round(area) == 0:
        return 0, 0, 0, 0
    ratio = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    h = min(height, max(1, round(math.sqrt(area / ratio))))
    w = min(width, max(1, round(area / h)))
    if w == width:  # the rectangle spans the width: fit its height to the area
        h = min(height, max(1, round(area / width)))
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    return top, left, h, w


def occlude(x: Tensor, fraction: float, rng: np.random.Generator, fill: Tensor | float = 0.0) -> Tensor:
    """``x`` (``[C, H, W]`` or ``[..., C, H, W]``) with one rectangle (`occlusion_box`) set to ``fill`` (a scalar or
    a per-channel ``[C]`` tensor); the same rectangle for every leading index."""
    if fraction <= 0:
        return x
    top, left, h, w = occlusion_box(x.shape[-2], x.shape[-1], fraction, rng)
    out = x.clone()
    value = torch.as_tensor(fill, dtype=x.dtype)
    if value.ndim == 1:
        value = value.view(-1, 1, 1)
    out[..., top : top + h, left : left + w] = value
    return out


def add_gaussian_noise(x: Tensor, std: float, rng: np.random.Generator) -> Tensor:
    """``x + std·ε`` with ``ε ~ N(0, 1)`` drawn from ``rng`` per element (not clipped)."""
    if std <= 0:
        return x
    noise = torch.from_numpy(rng.standard_normal(tuple(x.shape)))
    return x + (std * noise).to(x.dtype)


# ------------------------------------------------------------------------------------------------------------- text

KEYBOARD_ROWS = ("1234567890", "qwertyuiop", "asdfghjkl", "zxcvbnm")
"""The QWERTY rows; row ``r``'s key ``i`` sits at ``x = i + ROW_OFFSETS[r]`` (key widths)."""
ROW_OFFSETS = (0.0, 0.5, 0.75, 1.25)
TYPO_OPS = ("substitute", "swap", "delete")


def keyboard_neighbours() -> dict[str, str]:
    """Each key's neighbours on the staggered QWERTY layout: the keys either side in its row, and the keys of the
    rows above and below whose centres are within 0.75 key widths (e.g. ``s -> adwezx``, ``g -> fhtyvb``)."""
    pos = {c: (r, i + ROW_OFFSETS[r]) for r, row in enumerate(KEYBOARD_ROWS) for i, c in enumerate(row)}
    out: dict[str, str] = {}
    for c, (r, x) in pos.items():
        near = [(abs(x2 - x), d) for d, (r2, x2) in pos.items()
                if d != c and ((r2 == r and abs(x2 - x) == 1.0) or (abs(r2 - r) == 1 and abs(x2 - x) <= 0.75))]
        out[c] = "".join(d for _, d in sorted(near))
    return out


NEIGHBOURS = keyboard_neighbours()


def _neighbour(c: str, rng: np.random.Generator) -> str:
    options = NEIGHBOURS[c.lower()]
    out = options[int(rng.integers(len(options)))]
    return out.upper() if c.isupper() else out


def keyboard_typos(text: str, p: float, rng: np.random.Generator, ops: tuple[str, ...] = TYPO_OPS) -> str:
    """Belinkov & Bisk 2018 natural noise: each letter or digit (a key of `KEYBOARD_ROWS`, either case) is, with
    probability ``p``, corrupted by one of ``ops`` chosen uniformly: ``substitute`` (a random `keyboard_neighbours`
    key, case kept), ``swap`` (with the next character, when that is also a key and differs; a substitution
    otherwise; the swapped-in character is not corrupted again) or ``delete``."""
    bad = sorted(set(ops) - set(TYPO_OPS))
    if bad or not ops:
        raise ValueError(f"typo ops must be a non-empty subset of {TYPO_OPS}, got {ops}")
    if p <= 0:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.lower() not in NEIGHBOURS or rng.random() >= p:
            out.append(c)
            i += 1
            continue
        op = ops[int(rng.integers(len(ops)))]
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if op == "swap" and nxt and nxt.lower() in NEIGHBOURS and nxt != c:
            out += [nxt, c]
            i += 2
            continue
        if op != "delete":
            out.append(_neighbour(c, rng))
        i += 1
    return "".join(out)


WORD = re.compile(r"\S+\s*")


def drop_words(text: str, p: float, rng: np.random.Generator) -> str:
    """Remove each whitespace-separated word, together with the whitespace after it, with probability ``p``
    (leading whitespace is kept)."""
    if p <= 0:
        return text
    lead = text[: len(text) - len(text.lstrip())]
    words = WORD.findall(text[len(lead):])
    keep = rng.random(len(words)) >= p
    return lead + "".join(w for w, k in zip(words, keep, strict=True) if k)


# -------------------------------------------------------------------------------------------------------- waveforms


def snr_db(signal: Tensor, noise: Tensor) -> float:
    """``10·log10(mean(s²) / mean(n²))``."""
    return 10.0 * math.log10(float(signal.double().pow(2).mean()) / float(noise.double().pow(2).mean()))


def add_noise_at_snr(x: Tensor, snr: float, rng: np.random.Generator) -> Tensor:
    """``x`` plus white Gaussian noise at signal-to-noise ratio ``snr`` dB: noise std
    ``sqrt(mean(x²) / 10^(snr/10))``. A silent (all-zero) or empty signal is returned unchanged."""
    power = float(x.double().pow(2).mean()) if x.numel() else 0.0
    if power == 0.0:
        return x
    std = math.sqrt(power / 10.0 ** (snr / 10.0))
    return x + torch.from_numpy(std * rng.standard_normal(x.numel())).to(x.dtype).view_as(x)


def zero_chunks(x: Tensor, fraction: float, rng: np.random.Generator, *, chunk: int) -> Tensor:
    """``x`` (``[N]``) with ``⌊fraction·N / chunk⌉`` of its ``⌈N / chunk⌉`` consecutive ``chunk``-sample chunks,
    chosen without replacement, set to 0."""
    if fraction <= 0 or x.numel() == 0:
        return x
    n_chunks = math.ceil(x.numel() / chunk)
    k = min(n_chunks, round(fraction * x.numel() / chunk))
    out = x.clone()
    for c in rng.choice(n_chunks, size=k, replace=False).tolist():
        out[c * chunk : (c + 1) * chunk] = 0.0
    return out


# ------------------------------------------------------------------------------------------- time series and frames


def choose(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """``⌊fraction·n⌉`` distinct indices of ``range(n)``, sorted."""
    return np.sort(rng.choice(n, size=min(n, round(fraction * n)), replace=False))


def zero_slices(x: Tensor, fraction: float, rng: np.random.Generator, *, axis: int = 0, fill: float = 0.0) -> Tensor:
    """``x`` with `choose` ``(x.shape[axis], fraction)`` slices along ``axis`` set to ``fill``."""
    if fraction <= 0:
        return x
    out = x.clone()
    index = torch.from_numpy(choose(x.shape[axis], fraction, rng))
    out.index_fill_(axis, index, fill)
    return out


def add_channel_noise(x: Tensor, scale: float, rng: np.random.Generator) -> Tensor:
    """``x_tc + scale·σ_c·ε_tc`` for a ``[T, C]`` series, ``σ_c`` channel ``c``'s (population) standard deviation
    over the ``T`` steps; with a single step there is no spread to measure and ``σ_c = 1`` (one unit of the value's
    scale: the configured std when the decoder normalises)."""
    if scale <= 0:
        return x
    sigma = x.double().std(dim=0, correction=0) if x.shape[0] > 1 else torch.ones(x.shape[1], dtype=torch.float64)
    noise = torch.from_numpy(rng.standard_normal(tuple(x.shape)))
    return x + (scale * sigma * noise).to(x.dtype)


def drop_frames(x: Tensor, fraction: float, rng: np.random.Generator) -> Tensor:
    """``x`` (``[T, ...]``) with ``⌊fraction·(T-1)⌉`` of frames ``1..T-1`` replaced by the last kept frame before
    them (frame 0 is always kept)."""
    if fraction <= 0 or x.shape[0] < 2:
        return x
    dropped = set((choose(x.shape[0] - 1, fraction, rng) + 1).tolist())
    source = []
    last = 0
    for t in range(x.shape[0]):
        if t not in dropped:
            last = t
        source.append(last)
    return x[torch.tensor(source)].clone()

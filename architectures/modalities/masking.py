"""Token masks shared by the modality plug-ins' ``mask`` methods (``bool[B, T]``, True = masked).

* `random_token_mask` (MAE, He et al. 2022): per row, exactly ``k = ⌊ratio·n + ½⌋`` of the row's ``n`` maskable
  tokens (all ``T`` tokens unless a ``maskable`` mask is given) are masked, chosen uniformly without replacement as
  the ``k`` smallest of i.i.d. uniform noise values (MAE's argsort of noise). ``min_count=1`` gives BERT's count
  ``max(1, ⌊ratio·n + ½⌋)`` (Devlin et al. 2019) for rows with a maskable token.
* `tube_mask` (VideoMAE, Tong et al. 2022): one `random_token_mask` over the ``S`` spatial positions, repeated over
  the ``G`` temporal groups, so the same spatial patches are hidden in every frame-group (token order: group-major,
  index ``g·S + s``).

Randomness comes from ``generator``: one ``torch.Generator`` drawing the rows in order, a sequence of one generator
per row (a sample's mask then does not depend on its batch position), or None for torch's global generator. Noise is
drawn on the generator's device and the mask returned on ``device``; the same generator state gives the same mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mmssl.architectures.errors import ArchitectureError

Generators = torch.Generator | Sequence[torch.Generator] | None


def masked_count(ratio: float, n: int) -> int:
    """``⌊ratio·n + ½⌋``: ``ratio·n`` rounded half up."""
    return math.floor(ratio * n + 0.5)


def check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise ArchitectureError(f"mask ratio must be in [0, 1], got {ratio}")


def uniform_noise(rows: int, length: int, generator: Generators) -> Tensor:
    """``[rows, length]`` uniform noise from ``generator`` (see the module docstring), on the CPU or the
    generator's device."""
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.rand(rows, length, generator=generator, device=device)
    gens = list(generator)
    if len(gens) != rows:
        raise ArchitectureError(f"got {len(gens)} mask generators for {rows} rows")
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
    mask = ranks < counts[:, None]
    return mask.to(device) if device is not None else mask


def tube_mask(rows: int, groups: int, spatial: int, ratio: float, generator: Generators, *,
              device: torch.device | str | None = None) -> Tensor:
    """``bool[rows, groups·spatial]``: the same ``⌊ratio·S + ½⌋`` spatial positions masked in every temporal
    group."""
    spatial_mask = random_token_mask(rows, spatial, ratio, generator)
    mask = spatial_mask.unsqueeze(1).expand(rows, groups, spatial).reshape(rows, groups * spatial)
    return mask.to(device) if device is not None else mask

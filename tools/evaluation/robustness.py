"""Robustness scores from curves of a metric against a corruption level (MultiBench, Liang et al. 2021).

A robustness evaluation re-decodes the test shards with a corrupted decoder
(`architectures.modalities.base.ModalityPlugin.corrupted_decoder`) at levels ``0 = ℓ_0 < ℓ_1 < ... < ℓ_n ≤ 1`` and
measures the metric ``f(ℓ_i)`` at each: one *curve* per (modality, corruption kind). MultiBench scores a curve two
ways:

* **relative robustness**: the (normalised) area under the curve, by the trapezoid rule::

      RR(f) = 1/(ℓ_n - ℓ_0) · Σ_i (ℓ_{i+1} - ℓ_i)·(f(ℓ_i) + f(ℓ_{i+1}))/2

  MultiBench integrates its 11 levels 0, 0.1, ..., 1 with step 0.1, which is this formula on that grid; the
  normalisation makes it the curve's mean value on any grid (clean accuracy for a perfectly robust model).
* **effective robustness** (after Taori et al. 2020): how much better the curve holds up than a reference model's
  once both start from the same clean value. MultiBench shifts the late-fusion baseline's curve ``g`` to the model's
  clean value, ``β(ℓ) = g(ℓ) - g(ℓ_0) + f(ℓ_0)``, and sums ``f - β`` over its levels; here the gap is integrated
  like RR (trapezoid, normalised) so the value does not depend on the number of levels::

      ER(f; g) = RR(f - β) = RR(f) - RR(g) - f(ℓ_0) + g(ℓ_0)

  The per-model form (no reference model; ``reference`` a number or ``None``): the reference is a perfectly robust
  model with clean value ``c`` (``reference``, or ``f(ℓ_0)`` by default), ``ER(f) = RR(f) - c``: minus the mean drop
  from clean performance (0 for a model the corruption does not hurt). MultiBench further max-min normalises both
  scores across the models it compares; `robustness_score` reports the raw values (normalise over the models you
  compare).

Curves are "higher is better" metrics (accuracy, recall); for an error metric lower scores are better.

Modality removal (the missing-modality sweep): `modality_removal_drop` reports, per removed modality, the metric
without it and its drop from the full model, absolute and relative to the full value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any

from mmssl.tools.errors import ToolError

DEFAULT_LEVELS = tuple(i / 10 for i in range(11))  # MultiBench's grid: 0, 0.1, ..., 1


def _check_curve(levels: Sequence[float], values: Sequence[float], where: str) -> tuple[list[float], list[float]]:
    lv, vs = [float(x) for x in levels], [float(x) for x in values]
    if len(lv) < 2:
        raise ToolError(f"{where}: a robustness curve needs at least 2 levels, got {lv}")
    if len(vs) != len(lv):
        raise ToolError(f"{where}: {len(vs)} metric values for {len(lv)} levels {lv}")
    if any(not 0.0 <= x <= 1.0 for x in lv) or any(b <= a for a, b in pairwise(lv)):
        raise ToolError(f"{where}: levels must increase strictly within [0, 1], got {lv}")
    bad = [x for x in vs if not math.isfinite(x)]
    if bad:
        raise ToolError(f"{where}: metric values must be finite, got {bad[0]!r} in {vs}")
    return lv, vs


def _area(levels: list[float], values: list[float]) -> float:
    area = sum((b - a) * (fa + fb) / 2 for a, b, fa, fb in zip(levels, levels[1:], values, values[1:], strict=False))
    return area / (levels[-1] - levels[0])


def relative_robustness(levels: Sequence[float], values: Sequence[float], *, where: str = "curve") -> float:
    """MultiBench's relative robustness: the trapezoid area under ``values`` against ``levels``, divided by the
    level span (module docstring). ``where`` names the curve in error messages."""
    lv, vs = _check_curve(levels, values, where)
    return _area(lv, vs)


def effective_robustness(levels: Sequence[float], values: Sequence[float],
                         clean_reference: Sequence[float] | float | None = None, *, where: str = "curve") -> float:
    """MultiBench's effective robustness (module docstring). ``clean_reference``: the reference model's curve at
    the same ``levels`` (MultiBench: late fusion), shifted to start at ``values[0]``; or a number ``c``, the clean
    value of a perfectly robust reference (per-model form, ``RR(f) - c``); ``None``: ``c = values[0]``."""
    lv, vs = _check_curve(levels, values, where)
    if clean_reference is None or isinstance(clean_reference, int | float):
        clean = vs[0] if clean_reference is None else float(clean_reference)
        if not math.isfinite(clean):
            raise ToolError(f"{where}: clean reference value must be finite, got {clean_reference!r}")
        return _area(lv, vs) - clean
    _, ref = _check_curve(lv, clean_reference, f"{where} (reference curve)")
    return _area(lv, [f - (g - ref[0] + vs[0]) for f, g in zip(vs, ref, strict=True)])


def robustness_score(curves: Mapping[str, Mapping[str, Sequence[float]]], levels: Sequence[float] = DEFAULT_LEVELS,
                     *, reference: str | None = None) -> dict[str, dict[str, Any]]:
    """One robustness number per model.

    Args:
        curves: model -> curve name (``"modality/kind"``, e.g. ``"image/blur"``) -> metric at each of ``levels``.
        levels: the corruption levels every curve was measured at.
        reference: a model of ``curves`` to measure effective robustness against (MultiBench uses late fusion); it
            must have every curve the others have. Without it, effective robustness is the per-model form.

    Returns:
        model -> ``{"score": mean relative robustness over its curves, "relative": {curve: RR},
        "effective": {curve: ER}, "effective_mean": mean ER, "clean": {curve: value at the first level}}``.
    """
    if not curves:
        raise ToolError("robustness curves: no model given")
    if reference is not None and reference not in curves:
        raise ToolError(f"robustness reference model {reference!r} has no curves; models: {sorted(curves)}")
    out: dict[str, dict[str, Any]] = {}
    for model, per_curve in curves.items():
        if not per_curve:
            raise ToolError(f"robustness curves: model {model!r} has no curve")
        rel, eff, clean = {}, {}, {}
        for name, values in per_curve.items():
            where = f"model {model!r} curve {name!r}"
            rel[name] = relative_robustness(levels, values, where=where)
            ref: Sequence[float] | None = None
            if reference is not None:
                if name not in curves[reference]:
                    raise ToolError(f"{where}: reference model {reference!r} has no curve {name!r}; it has "
                                     f"{sorted(curves[reference])}")
                ref = curves[reference][name]
            eff[name] = effective_robustness(levels, values, ref, where=where)
            clean[name] = float(values[0])
        out[model] = {"score": sum(rel.values()) / len(rel), "relative": rel, "effective": eff,
                      "effective_mean": sum(eff.values()) / len(eff), "clean": clean}
    return out


def modality_removal_drop(full: float, removed: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Per removed modality ``m``: ``{"value": f_{-m}, "drop": f - f_{-m}, "relative_drop": (f - f_{-m}) / |f|}``
    (``relative_drop`` is NaN when ``f = 0``), ``f = full`` the metric with every modality present and ``f_{-m}``
    the metric with ``m`` removed. A large drop means the model leans on ``m``."""
    f = float(full)
    if not math.isfinite(f):
        raise ToolError(f"modality removal: full-model metric must be finite, got {full!r}")
    if not removed:
        raise ToolError("modality removal: no removed-modality result given")
    out: dict[str, dict[str, float]] = {}
    for modality, value in removed.items():
        v = float(value)
        if not math.isfinite(v):
            raise ToolError(f"modality removal: metric without {modality!r} must be finite, got {value!r}")
        out[modality] = {"value": v, "drop": f - v, "relative_drop": (f - v) / abs(f) if f else math.nan}
    return out

"""Robustness curves of an exported model (MultiBench protocol, Liang et al. 2021; thesis ch. 7).

Classifiers are fitted on clean features (the linear probes of `tools.evaluation.evaluate`), then the *test* shards are
re-decoded with one modality corrupted at each noise level (`ModalityPlugin.corrupted_decoder`: blur, occlusion,
token drop, typos, audio noise, time-series gaps, ...) and scored again:

* ``probe:<m>``: the unimodal probe of modality ``m`` under noise on ``m``;
* ``probe:fused``: the fused-feature probe under noise on each modality in turn;
* ``R@1:<q>-<t>``: retrieval Recall@1 (mean of both directions) under noise on either side.

Each modality is also removed entirely (its ``present`` mask all False: the models' missing-modality path) and the
fused probe scored again. The robustness score is `tools.evaluation.robustness.robustness_score` over all curves
(relative robustness: the normalised area under the metric-vs-level curve).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmssl.architectures.modalities import get_modality
from mmssl.tools.errors import ToolError
from mmssl.tools.evaluation.features import Corruption, ModelFeatures, extract_model_features
from mmssl.tools.evaluation.probe import ProbeResult, labels_of
from mmssl.tools.evaluation.retrieval import group_ids, recall_both_ways
from mmssl.tools.evaluation.robustness import modality_removal_drop, robustness_score
from mmssl.tools.evaluation.runtime import Runtime
from mmssl.tools.export.model import LoadedModel


def _probe_accuracy(result: ProbeResult, x: torch.Tensor, usable: torch.Tensor, meta: dict[str, list[Any]],
                    label: str) -> float:
    rows, labels = labels_of(meta, usable, label, "--test-shards")
    assert result.probe is not None
    return result.probe.accuracy(x[rows], labels)


def _mean_r1(feats: ModelFeatures, clean: ModelFeatures, q: str, t: str, match_field: str | None) -> float:
    rows = (clean.present[q] & clean.present[t]).nonzero().squeeze(1)
    if rows.numel() == 0:
        return 0.0
    values = [clean.meta[match_field][i] for i in rows.tolist()] if match_field else list(range(rows.numel()))
    groups = group_ids(values)
    lost = ~(feats.present[q] & feats.present[t])[rows]  # a side that no longer decodes: a miss
    result = recall_both_ways(feats.embeddings[q][rows], feats.embeddings[t][rows], groups, (q, t), (1,), lost=lost)
    return float(result["mean"]["R@1"])  # type: ignore[index]


def _metrics(feats: ModelFeatures, clean: ModelFeatures, modality: str, probes: dict[str, ProbeResult],
             label: str | None, pairs: Sequence[tuple[str, str]], match_field: str | None) -> dict[str, float]:
    """Every metric affected by noise on ``modality``, over the rows usable when clean: a sample whose corrupted
    input no longer decodes (e.g. every word dropped) keeps its row, with the model's missing-modality features."""
    if feats.keys != clean.keys:
        raise ToolError("the corrupted pass read other samples than the clean pass (shards changed meanwhile?)")
    out: dict[str, float] = {}
    if label and modality in probes:
        out[f"probe:{modality}"] = _probe_accuracy(probes[modality], feats.pooled[modality], clean.present[modality],
                                                   clean.meta, label)
    if label and "fused" in probes and feats.fused is not None and clean.fused_present is not None:
        out["probe:fused"] = _probe_accuracy(probes["fused"], feats.fused, clean.fused_present, clean.meta, label)
    for q, t in pairs:
        if modality in (q, t):
            out[f"R@1:{q}-{t}"] = _mean_r1(feats, clean, q, t, match_field)
    return out


def run_robustness(loaded: LoadedModel, test_shards: str, probes: dict[str, ProbeResult], label: str | None, *,
                   levels: Sequence[float], pairs: Sequence[tuple[str, str]], match_field: str | None,
                   clean: ModelFeatures, runtime: Runtime | None = None, cache: bool = True) -> dict[str, Any]:
    """Every curve and removal of the module docstring; each corrupted pass is a feature extraction on
    ``runtime`` (its own progress bar)."""
    levels = sorted(float(v) for v in levels)
    curves: dict[str, dict[str, list[float]]] = {}  # metric -> "modality:kind" -> values at levels
    removed: dict[str, dict[str, float]] = {}  # metric -> modality -> value with the modality removed
    for m in loaded.modalities:
        plugin = get_modality(m)
        for kind in plugin.corruptions:
            for level in levels:
                feats = clean if level == 0 else extract_model_features(
                    loaded, test_shards, where="--test-shards", corruption=Corruption(m, kind, level),
                    runtime=runtime, cache=cache)
                for metric, value in _metrics(feats, clean, m, probes, label, pairs, match_field).items():
                    curves.setdefault(metric, {}).setdefault(f"{m}:{kind}", []).append(value)
        if len(loaded.modalities) > 1 and label and "fused" in probes:
            feats = extract_model_features(loaded, test_shards, where="--test-shards",
                                           corruption=Corruption(m, "removed"), runtime=runtime, cache=cache)
            value = _metrics(feats, clean, m, probes, label, [], match_field).get("probe:fused")
            if value is not None:
                removed.setdefault("probe:fused", {})[m] = value
    clean_fused = curves.get("probe:fused", {})
    full = next(iter(clean_fused.values()))[0] if clean_fused else None
    flat = {f"{metric} | {name}": values for metric, named in curves.items() for name, values in named.items()}
    return {
        "levels": levels,
        "curves": curves,
        "removed": removed,
        "removal_drop": ({m: d["drop"] for m, d in modality_removal_drop(full, removed["probe:fused"]).items()}
                         if full is not None and removed.get("probe:fused") else {}),
        "score": robustness_score({"model": flat}, levels)["model"] if flat else {"score": float("nan")},
    }

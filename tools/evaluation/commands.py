"""Evaluation commands over exported encoders: linear probe and retrieval, each beside the random-init floor; a
``runtime`` (`tools.evaluation.runtime.Runtime`: device, batch size, decoding workers, precision) says how the
features are extracted (default: the CPU, one process)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmssl.architectures.encoder import read_meta
from mmssl.data_pipelines.shards import atomic_write_text
from mmssl.tools.errors import ToolError
from mmssl.tools.evaluation.features import extract
from mmssl.tools.evaluation.probe import fmt_pct, labels_of, linear_probe
from mmssl.tools.evaluation.retrieval import group_ids, recall_both_ways
from mmssl.tools.evaluation.runtime import Runtime
from mmssl.tools.export.run import EXPORT_INDEX

FLOOR_SEED = 0


def _write(path: str | Path | None, payload: dict[str, Any]) -> None:
    if path:
        atomic_write_text(Path(path), json.dumps(payload, indent=2) + "\n")


def run_probe(encoder_dir: str | Path, *, shards: str, test_shards: str, label: str, features: str = "pooled",
              few_shot: int | None = None, floor: bool = True, seed: int = 0, json_out: str | None = None,
              runtime: Runtime | None = None, solver: str = "auto", cache: bool = True) -> dict[str, Any]:
    if features not in ("pooled", "embedding"):
        raise ToolError(f"--features must be 'pooled' or 'embedding', got {features!r}")
    meta = read_meta(encoder_dir)
    results: dict[str, Any] = {"encoder": str(encoder_dir), "modality": meta["modality"], "label": label,
                               "features": features, "train_shards": shards, "test_shards": test_shards}
    variants = {"pretrained": False, "random_init": True} if floor else {"pretrained": False}
    for name, random_init in variants.items():
        tr = extract(encoder_dir, shards, where="--shards", random_init=random_init, seed=FLOOR_SEED,
                     runtime=runtime, cache=cache)
        te = extract(encoder_dir, test_shards, where="--test-shards", random_init=random_init, seed=FLOOR_SEED,
                     runtime=runtime, cache=cache)
        tr_rows, tr_labels = labels_of(tr.meta, tr.present, label, "--shards")
        te_rows, te_labels = labels_of(te.meta, te.present, label, "--test-shards")
        pick = (lambda f, rows: f.pooled[rows]) if features == "pooled" else (lambda f, rows: f.embeddings[rows])
        result = linear_probe(pick(tr, tr_rows), tr_labels, pick(te, te_rows), te_labels, few_shot=few_shot,
                              seed=seed, solver=solver, runtime=runtime)
        results[name] = {**result.to_dict(), "data_errors": {**tr.data_errors, **te.data_errors}}
    _write(json_out, results)
    return results


def run_retrieval(export_dir: str | Path, *, shards: str, query: str, target: str, match_field: str | None = None,
                  floor: bool = True, json_out: str | None = None, ks: tuple[int, ...] = (1, 5, 10),
                  runtime: Runtime | None = None, cache: bool = True) -> dict[str, Any]:
    export = Path(export_dir)
    index_file = export / EXPORT_INDEX
    if not index_file.is_file():
        raise ToolError(f"{export} is not an export directory ({EXPORT_INDEX} missing); run `mmssl export`")
    encoders = json.loads(index_file.read_text())["encoders"]
    for m in (query, target):
        if m not in encoders:
            raise ToolError(f"{export} has no {m!r} encoder (encoders: {sorted(encoders)})")
    results: dict[str, Any] = {"export": str(export), "shards": shards, "query": query, "target": target,
                               "match_field": match_field}
    variants = {"pretrained": False, "random_init": True} if floor else {"pretrained": False}
    for name, random_init in variants.items():
        fq = extract(encoders[query], shards, random_init=random_init, seed=FLOOR_SEED, runtime=runtime, cache=cache)
        ft = extract(encoders[target], shards, random_init=random_init, seed=FLOOR_SEED, runtime=runtime, cache=cache)
        if fq.keys != ft.keys:
            raise ToolError("query and target encoders read different samples from the shards")
        rows = (fq.present & ft.present).nonzero().squeeze(1)
        if match_field:
            if match_field not in fq.meta:
                raise ToolError(f"--match-field {match_field!r} is not a metadata field (fields: {sorted(fq.meta)})")
            groups = group_ids([fq.meta[match_field][i] for i in rows.tolist()])
        else:
            groups = torch.arange(rows.numel())
        results[name] = recall_both_ways(fq.embeddings[rows], ft.embeddings[rows], groups, (query, target), ks)
    _write(json_out, results)
    return results


def format_probe(results: dict[str, Any]) -> str:
    lines = [f"linear probe of {results['encoder']} on '{results['label']}' ({results['features']} features)"]
    for name in ("pretrained", "random_init"):
        if name in results:
            r = results[name]
            lines.append(f"  {name:<12} top-1 {fmt_pct(r['top1']):>7}   (l2={r['best_l2']:g}, train {r['n_train']}"
                         f"+{r['n_val']} val, test {r['n_test']}, majority class {fmt_pct(r['chance_top1'])})")
    return "\n".join(lines)


def format_retrieval(results: dict[str, Any]) -> str:
    q, t = results["query"], results["target"]
    lines = [f"retrieval on {results['shards']}"]
    for name in ("pretrained", "random_init"):
        if name in results:
            r = results[name]
            fw, bw = r[f"{q}->{t}"], r[f"{t}->{q}"]
            lines.append(f"  {name:<12} {q}->{t} R@1/5/10 {fmt_pct(fw['R@1'])}/{fmt_pct(fw['R@5'])}/"
                         f"{fmt_pct(fw['R@10'])}   {t}->{q} {fmt_pct(bw['R@1'])}/{fmt_pct(bw['R@5'])}/"
                         f"{fmt_pct(bw['R@10'])}   (n={r['n']}, chance R@1 {fmt_pct(r['chance_R@1'])})")
    return "\n".join(lines)

"""``mmssl evaluate``: the standard downstream numbers of any checkpoint of any architecture family, in one command.

Given a run directory (exported on the fly from its latest checkpoint), an export directory or ``<export>/model``,
and labelled train/test shards, it computes, for the pretrained model and for the same architecture randomly
initialised (the floor):

* **linear probes** (`tools.evaluation.probe`: L2 sweep on a validation split, refit, test) on every modality's pooled
  features and on the fused feature (`tools.evaluation.features`);
* **retrieval** Recall@1/5/10 both directions for every modality pair (chunked), with ITM re-ranking of the top-k
  for models trained with a matching head;
* **zero-shot classification** of every non-text modality from text prompts (templates x class names, CLIP);
* **diagnostics**: alignment / uniformity (Wang & Isola 2020), modality gap (Liang et al. 2022), effective rank
  (Roy & Vetterli 2007), and the partial information decomposition of the label over the unimodal probes'
  discretised predictions (redundancy, uniqueness, synergy; Liang et al. 2023, BROJA estimator);
* **robustness** (`tools.evaluation.robustness_eval`): metrics vs noise level per modality and with each modality
  removed, one robustness score.

Everything goes to ``<out>/results.json`` with PNG plots beside it, and a table is printed (`tools.evaluation.report`).
Class names for zero-shot come from ``--prompts`` (`tools.evaluation.prompts`: integer labels are named by position
or by an object's keys; integer labels without a prompt file skip zero-shot, saying why); where and how features are
computed from a `tools.evaluation.runtime.Runtime` (``--device``, ``--batch-size``, ``--workers``, ``--precision``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmssl.data_pipelines.shards import atomic_write_text
from mmssl.pretrain import checkpoint
from mmssl.pretrain.rundir import EVAL, EXPORT, RECIPE
from mmssl.tools.errors import ToolError
from mmssl.tools.evaluation.diagnostics import embedding_diagnostics
from mmssl.tools.evaluation.features import ModelFeatures, extract_model_features, model_device
from mmssl.tools.evaluation.interactions import pid_from_predictions
from mmssl.tools.evaluation.probe import ProbeResult, choose_solver, label_values, labels_of, linear_probe
from mmssl.tools.evaluation.prompts import PromptFile, integer_label, load_prompt_file, load_templates, match_labels
from mmssl.tools.evaluation.retrieval import group_ids, recall_both_ways, rerank_recall
from mmssl.tools.evaluation.runtime import Runtime
from mmssl.tools.evaluation.zero_shot import (
    DEFAULT_TEMPLATES,
    class_embeddings,
    label_indices,
    zero_shot_accuracy,
    zero_shot_predict,
)
from mmssl.tools.export.model import CONFIG, LoadedModel, load_model
from mmssl.tools.export.run import EXPORT_INDEX, MODEL_DIR, export_run

FLOOR_SEED = 0
VARIANTS = ("pretrained", "random_init")
RESULTS = "results.json"
TEXT = "text"


def resolve_model_dir(target: str | Path) -> tuple[Path, Path | None]:
    """``(model dir, run dir or None)`` from a run directory, an export directory or a model directory; a run is
    exported (to ``<run>/export``) when it has no export of its latest checkpoint yet."""
    path = Path(target)
    if (path / RECIPE).is_file():
        found = checkpoint.find(path, "latest")
        if found is None:
            raise ToolError(f"{path} has no checkpoint to evaluate yet")
        export = path / EXPORT
        index = export / EXPORT_INDEX
        current = index.is_file() and json.loads(index.read_text()).get("checkpoint") == str(found[0] / found[1])
        if not current or not (export / MODEL_DIR / CONFIG).is_file():
            export_run(path, export)
        return export / MODEL_DIR, path
    if (path / EXPORT_INDEX).is_file():
        return path / MODEL_DIR, None
    if (path / CONFIG).is_file():
        return path, None
    raise ToolError(f"{path} is neither a run directory ({RECIPE}), an export directory ({EXPORT_INDEX}) nor "
                     f"an exported model ({CONFIG})")


def _rows(feats: ModelFeatures, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, D], usable bool [N])`` of a probe input: a modality's pooled features or ``fused``."""
    if name == "fused":
        assert feats.fused is not None and feats.fused_present is not None
        return feats.fused, feats.fused_present
    return feats.pooled[name], feats.present[name]


def probe_inputs(feats: ModelFeatures) -> list[str]:
    return [*feats.pooled, *(["fused"] if feats.fused is not None else [])]


def run_probes(train: ModelFeatures, test: ModelFeatures, label: str, *, few_shot: int | None, seed: int,
               solver: str = "auto", runtime: Runtime | None = None) -> dict[str, ProbeResult]:
    out = {}
    for name in probe_inputs(train):
        x, usable = _rows(train, name)
        xt, usable_t = _rows(test, name)
        tr_rows, tr_labels = labels_of(train.meta, usable, label, "--shards")
        te_rows, te_labels = labels_of(test.meta, usable_t, label, "--test-shards")
        out[name] = linear_probe(x[tr_rows], tr_labels, xt[te_rows], te_labels, few_shot=few_shot, seed=seed,
                                 solver=solver, runtime=runtime)
    return out


def retrieval_pairs(modalities: Sequence[str]) -> list[tuple[str, str]]:
    return list(itertools.combinations(modalities, 2))


def run_retrieval(feats: ModelFeatures, pairs: Sequence[tuple[str, str]], match_field: str | None,
                  loaded: LoadedModel | None = None, rerank_k: int = 16) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for q, t in pairs:
        rows = (feats.present[q] & feats.present[t]).nonzero().squeeze(1)
        if rows.numel() == 0:
            raise ToolError(f"no test sample carries both {q!r} and {t!r}")
        if match_field:
            if match_field not in feats.meta:
                raise ToolError(f"--match-field {match_field!r} is not a metadata field (fields: "
                                 f"{sorted(feats.meta)})")
            groups = group_ids([feats.meta[match_field][i] for i in rows.tolist()])
        else:
            groups = torch.arange(rows.numel())
        entry = recall_both_ways(feats.embeddings[q][rows], feats.embeddings[t][rows], groups, (q, t))
        itm = loaded.itm if loaded is not None else None
        if itm and {itm["query"], itm["context"]} == {q, t} and feats.tokens:
            entry["itm_rerank"] = _itm_rerank(loaded, feats, rows, groups, itm["query"], itm["context"], rerank_k)
        out[f"{q}-{t}"] = entry
    return out


def _itm_rerank(loaded: LoadedModel, feats: ModelFeatures, rows: torch.Tensor, groups: torch.Tensor, query: str,
                context: str, k: int) -> dict[str, Any]:
    """Re-rank each query's top-k gallery items by the ITM head's p(match) (ALBEF / BLIP)."""
    tokens = {m: feats.tokens[m][rows] for m in (query, context)}
    masks = {m: feats.token_mask[m][rows] for m in (query, context)}
    device = model_device(loaded.model)
    out = {}
    for a, b in ((query, context), (context, query)):
        def score(ia: torch.Tensor, ib: torch.Tensor, a: str = a, b: str = b) -> torch.Tensor:
            pick = {a: ia, b: ib}
            return loaded.itm_scores(query, context, {m: tokens[m][pick[m]].to(device) for m in (query, context)},
                                     {m: masks[m][pick[m]].to(device) for m in (query, context)}).cpu()

        recall, _ = rerank_recall(feats.embeddings[a][rows], feats.embeddings[b][rows], groups, groups, score,
                                  k=min(k, rows.numel()), ks=tuple(x for x in (1, 5, 10) if x <= min(k, rows.numel())))
        out[f"{a}->{b}"] = recall
    out["k"] = k
    return out


class _TextEncoder:
    """The text side of a whole model, shaped like an exported `Encoder` for `tools.evaluation.zero_shot`."""

    modality = TEXT

    def __init__(self, loaded: LoadedModel, runtime: Runtime | None = None) -> None:
        self.loaded, self.runtime = loaded, runtime
        self._decoder = loaded.decoders([TEXT])[TEXT]

    def decoder(self) -> Any:
        return self._decoder

    @torch.no_grad()
    def __call__(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        device = model_device(self.loaded.model)
        x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
        with self.runtime.autocast() if self.runtime is not None else contextlib.nullcontext():
            out = self.loaded.model({TEXT: x})
        return out.pooled[TEXT].float().cpu(), out.embeddings[TEXT].float().cpu()


def zero_shot_labels(values: list[Any], keys: list[str], prompts: PromptFile | None, label: str
                     ) -> tuple[list[str], torch.Tensor] | str:
    """``(class names, class index per row)``, or why zero-shot cannot run: integer labels without a prompt file
    (the integers name no class; nothing is guessed)."""
    if prompts is not None:
        return prompts.classnames, match_labels(values, keys, prompts, "--test-shards")
    example = integer_label(values)
    if example is not None:
        return (f"the labels of {label!r} are integers (e.g. {example}); name the classes with --prompts FILE (a "
                "list of names indexed by label, an object label -> name, or CLIP_benchmark's classnames.txt)")
    names = sorted({str(v) for v in values})
    return names, label_indices([str(v) for v in values], names, "--test-shards")


def run_zero_shot(loaded: LoadedModel, test: ModelFeatures, label: str, *, prompts: PromptFile | None,
                  templates: list[str], runtime: Runtime | None = None, predictions: bool = False
                  ) -> dict[str, Any]:
    """Zero-shot scores of every non-text modality (`zero_shot_accuracy`); with ``predictions`` each entry also
    holds ``keys`` and ``predicted`` (class names) per scored row."""
    out: dict[str, Any] = {}
    encoder = _TextEncoder(loaded, runtime)
    weights: dict[tuple[str, ...], torch.Tensor] = {}
    for m in test.embeddings:
        if m == TEXT:
            continue
        rows, values = label_values(test.meta, test.present[m], label, "--test-shards")
        keys = [test.keys[i] for i in rows.tolist()]
        found = zero_shot_labels(values, keys, prompts, label)
        if isinstance(found, str):
            out[m] = {"skipped": found}
            continue
        names, y = found
        if tuple(names) not in weights:
            batch = runtime.batch_size if runtime is not None else 64
            weights[tuple(names)] = class_embeddings(encoder, names, templates, batch_size=batch)
        w = weights[tuple(names)]
        out[m] = zero_shot_accuracy(test.embeddings[m][rows], y, w, names)
        if predictions:
            out[m]["keys"] = keys
            out[m]["predicted"] = [names[i] for i in zero_shot_predict(test.embeddings[m][rows], w).tolist()]
    return out


def read_prompts(prompts: str | None, templates: str | None) -> tuple[PromptFile | None, list[str]]:
    """``--prompts`` and ``--templates``: the prompt file (or None) and the templates to use (the file's, the
    templates file's, else `DEFAULT_TEMPLATES`); templates given twice are an error."""
    found = load_prompt_file(prompts) if prompts else None
    extra = load_templates(templates) if templates else None
    if extra and found is not None and found.templates:
        raise ToolError(f"--templates {templates} and the templates in --prompts {found.source} are both given; "
                        "keep one")
    return found, extra or (found.templates if found is not None and found.templates else list(DEFAULT_TEMPLATES))


def run_diagnostics(feats: ModelFeatures, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    every = torch.stack(list(feats.present.values())).all(0)
    return embedding_diagnostics({m: e[every] for m, e in feats.embeddings.items()}, list(pairs))


def run_pid(probes: dict[str, ProbeResult], test: ModelFeatures, label: str) -> dict[str, Any]:
    """PID of the label over the two unimodal probes' predicted classes, on test rows carrying both modalities."""
    names = [m for m in test.pooled if m in probes][:2]
    if len(names) < 2:
        return {}
    both = test.present[names[0]] & test.present[names[1]]
    rows, labels = labels_of(test.meta, both, label, "--test-shards")
    preds = []
    for m in names:
        fitted = probes[m].probe
        assert fitted is not None
        preds.append([fitted.classes[i] for i in fitted.predict_index(test.pooled[m][rows]).tolist()])
    result = pid_from_predictions(preds[0], preds[1], labels)
    return {"modalities": names, **result.to_dict()}


def _variant(loaded: LoadedModel, variant: str, *, shards: str, test_shards: str, label: str | None,
             chosen: list[tuple[str, str]], match_field: str | None, prompts: PromptFile | None, templates: list[str],
             few_shot: int | None, seed: int, rerank_k: int, solver: str, runtime: Runtime, cache: bool
             ) -> tuple[dict[str, Any], ModelFeatures, dict[str, ProbeResult]]:
    """One variant's section of results.json, its test features and its fitted probes."""
    random_init = variant == "random_init"
    common = {"random_init": random_init, "seed": FLOOR_SEED, "runtime": runtime, "cache": cache}
    test = extract_model_features(loaded, test_shards, where="--test-shards", keep_tokens=loaded.itm is not None,
                                  **common)
    section: dict[str, Any] = {"data_errors": dict(test.data_errors)}
    probes: dict[str, ProbeResult] = {}
    if label:
        train = extract_model_features(loaded, shards, where="--shards", **common)
        probes = run_probes(train, test, label, few_shot=few_shot, seed=seed, solver=solver, runtime=runtime)
        section["probe"] = {name: r.to_dict() for name, r in probes.items()}
        section["pid"] = run_pid(probes, test, label)
        if TEXT in loaded.modalities and len(loaded.modalities) > 1:
            section["zero_shot"] = run_zero_shot(loaded, test, label, prompts=prompts, templates=templates,
                                                 runtime=runtime)
    if len(loaded.modalities) > 1:
        section["retrieval"] = run_retrieval(test, chosen, match_field, loaded, rerank_k)
        section["diagnostics"] = run_diagnostics(test, chosen)
    return section, test, probes


def evaluate(target: str | Path, *, shards: str, test_shards: str, label: str | None, out_dir: str | Path | None = None,
             match_field: str | None = None, pairs: Sequence[tuple[str, str]] | None = None,
             prompts: str | None = None, templates: str | None = None, floor: bool = True, few_shot: int | None = None,
             seed: int = 0, robustness: bool = True, levels: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
             rerank_k: int = 16, runtime: Runtime | None = None, probe_solver: str = "auto", cache: bool = True
             ) -> dict[str, Any]:
    """Everything of the module docstring; ``runtime`` (default: `Runtime()`, the GPU when there is one) says
    where features are extracted and the mini-batch probe runs, ``probe_solver`` which probe solver
    (`tools.evaluation.probe.choose_solver`), ``cache`` whether features are read from / written to the cache."""
    from mmssl.tools.evaluation.report import write_plots
    from mmssl.tools.evaluation.robustness_eval import run_robustness

    bad_levels = [v for v in levels if not 0.0 <= float(v) <= 1.0]
    if bad_levels:
        raise ToolError(f"--levels must lie in [0, 1] (0 = clean), got {bad_levels[0]}")
    if rerank_k < 1:
        raise ToolError(f"--rerank-k must be >= 1, got {rerank_k}")
    choose_solver(probe_solver, 0, 0)
    runtime = runtime or Runtime()
    prompt_file, prompt_templates = read_prompts(prompts, templates)
    model_dir, run_dir = resolve_model_dir(target)
    out = Path(out_dir) if out_dir else (run_dir / EVAL if run_dir else model_dir.parent / EVAL)
    results: dict[str, Any] = {"model": str(model_dir), "run": str(run_dir) if run_dir else None, "label": label,
                               "train_shards": shards, "test_shards": test_shards, "match_field": match_field,
                               "device": str(runtime.device), "precision": runtime.precision,
                               "prompts": prompt_file.source if prompt_file else None, "templates": prompt_templates}
    fitted: dict[str, dict[str, ProbeResult]] = {}
    test_feats: dict[str, ModelFeatures] = {}
    loaded_models: dict[str, LoadedModel] = {}
    for variant in VARIANTS if floor else VARIANTS[:1]:
        loaded = load_model(model_dir, random_init=variant == "random_init", seed=FLOOR_SEED)
        loaded.model.to(runtime.device)
        if loaded.itm_head is not None:
            loaded.itm_head.to(runtime.device)
        loaded_models[variant] = loaded
        results["family"] = loaded.family
        results["modalities"] = loaded.modalities
        chosen = list(pairs) if pairs else retrieval_pairs(loaded.modalities)
        for q, t in chosen:
            loaded.check_modality(q, "--pairs")
            loaded.check_modality(t, "--pairs")
        results[variant], test_feats[variant], fitted[variant] = _variant(
            loaded, variant, shards=shards, test_shards=test_shards, label=label, chosen=chosen,
            match_field=match_field, prompts=prompt_file, templates=prompt_templates, few_shot=few_shot, seed=seed,
            rerank_k=rerank_k, solver=probe_solver, runtime=runtime, cache=cache)
    if robustness:
        results["robustness"] = run_robustness(loaded_models["pretrained"], test_shards,
                                               fitted.get("pretrained", {}), label, levels=levels,
                                               pairs=list(pairs) if pairs else retrieval_pairs(results["modalities"]),
                                               match_field=match_field, clean=test_feats["pretrained"],
                                               runtime=runtime, cache=cache)
    results["plots"] = write_plots(results, out)
    atomic_write_text(out / RESULTS, json.dumps(results, indent=2) + "\n")
    results["results_file"] = str(out / RESULTS)
    return results

"""Every objective family end to end: the pretraining trainer on 2 ranks (DeepSpeed ZeRO-2, gloo; every group on the
same ranks, one after another, `tests.helpers.train_many`) over the real Asterisk shards, in hybrids that share one
encoder forward; each term is logged separately and must go down.

"Goes down" = the mean of a term over the last 10 steps is below its mean over the first 10 steps (the logged
value is the mean over ranks of the global-batch loss); for XDC's clustering term, whose k-means pseudo-labels are
re-drawn every ``refresh_every`` steps (the loss restarts from each new assignment), the last 10 steps before the
first refresh. Objectives whose loss can legitimately start low are
configured so that the comparison means something: the momentum queue uses α = 0 (pure InfoNCE against teacher
columns and queue), matching uses random in-batch negatives (hard negatives keep the loss at the prior
``H(1/3) ≈ 0.64`` for longer than a test can afford).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tiny_recipe_dict, write_recipe

pytestmark = pytest.mark.distributed

FUSION = {"family": "late_fusion", "fusion": {"query": "text", "width": 48, "depth": 1, "heads": 2}}
GROUPS: dict[str, dict[str, Any]] = {
    "contrastive_matching_momentum": {
        "model": FUSION,
        "objectives": {
            "contrastive": {"pairs": [["audio", "text"]]},
            "matching": {"query": "text", "context": "audio", "negatives": "random", "exclude_duplicates": "text"},
            "momentum_contrastive": {"pairs": [["audio", "text"]], "queue_size": 32, "weight": 0.5, "alpha": 0.0,
                                     "momentum": 0.9},
        },
        "steps": 100,
    },
    "milnce_siglip_intramodal_factorcl": {
        "data": {"views": {"audio": 2}},
        "objectives": {
            "contrastive": {"pairs": [["audio", "text"]], "positives": "text"},
            "siglip": {"pairs": [["audio", "text"]]},
            "intramodal": {"modalities": ["audio"], "proj_dim": 32, "hidden_dim": 64},
            "factorcl": {"modalities": ["audio", "text"], "variant": "supervised", "label": "family",
                         "hidden_dim": 64, "proj_dim": 32, "conditional_negatives": "same_label"},
        },
        "steps": 60,
    },
    "mlm_crossmlm_mae_maskedcluster_prefixlm": {
        "model": FUSION,
        "objectives": {
            "mlm": {"modality": "text"},
            "masked_cross": {"modality": "text", "context": "audio"},
            "mae": {"modality": "audio", "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2},
            "masked_cluster": {"modality": "audio", "num_clusters": 16},
            "prefix_lm": {"context": "audio", "target": "text", "width": 48, "depth": 1, "heads": 2},
        },
        "steps": 60,
    },
    "xdc_swav": {
        "objectives": {
            "clustering": {"variant": "xdc", "modalities": ["audio", "text"], "num_clusters": 8,
                           "refresh_every": 20, "samples_per_refresh": 256},
            "swav": {"modalities": ["audio", "text"], "num_prototypes": 16},
        },
        "steps": 60,
    },
}


def _terms(run: Path) -> dict[str, list[float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    names = [k for k in records[0] if k.startswith("loss/") and k.count("/") == 1]
    return {k: [r[k] for r in records] for k in names}


@pytest.fixture(scope="module")
def group_runs(asterisk_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str | None]]:
    """Every group trained on the same 2 ranks, one after another (`tests.helpers.train_many`): group -> (run
    directory, None or why it did not train)."""
    from tests.helpers.train_many import Job, run_jobs

    root = tmp_path_factory.mktemp("objective_groups")
    jobs = {}
    for group, spec in sorted(GROUPS.items()):
        recipe = tiny_recipe_dict(asterisk_data, data=spec.get("data", {}), model=spec.get("model", {}),
                                  objectives=spec["objectives"],
                                  train={"steps": spec["steps"], "warmup_steps": 5, "log_every": 10})
        recipe["objectives"] = spec["objectives"]  # replace, not merge, the default contrastive term
        jobs[group] = Job(str(write_recipe(root / f"{group}.yaml", recipe)), [], str(root / group))
    results = run_jobs(list(jobs.values()), timeout=900)
    return {group: (Path(job.run_dir), results[job.run_dir]) for group, job in jobs.items()}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_term_goes_down(group: str, group_runs: dict[str, tuple[Path, str | None]]) -> None:
    spec = GROUPS[group]
    run, error = group_runs[group]
    assert error is None, error[-4000:]
    terms = _terms(run)
    assert set(terms) == {f"loss/{name}" for name in spec["objectives"]}
    for name, values in terms.items():
        # a term whose targets are re-drawn every R steps (XDC's k-means pseudo-labels) restarts from a fresh
        # assignment at each refresh: it must go down within one assignment, the last 10 steps before the first
        refresh = spec["objectives"][name.removeprefix("loss/")].get("refresh_every", len(values))
        first, last = sum(values[:10]) / 10, sum(values[refresh - 10:refresh]) / 10
        assert last < first - 0.01 * abs(first), f"{group}: {name} did not go down ({first:.4f} -> {last:.4f})"

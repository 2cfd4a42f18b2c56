"""Every architecture family trains end to end: `mmssl pretrain` on 2 ranks (DeepSpeed ZeRO-2, gloo) over the
real bundled shards (Asterisk speech + transcripts; Fashion-MNIST images + captions for stitching), and every
logged loss term goes down (mean of the last 10 logged steps below the mean of the first 10)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import mmssl, tiny_recipe_dict, write_recipe

pytestmark = pytest.mark.distributed

MATCHING = {"query": "text", "context": "audio", "negatives": "random", "exclude_duplicates": "text"}
FAMILIES: dict[str, dict[str, Any]] = {
    "late_fusion_mult": {
        "model": {"family": "late_fusion", "fusion": {"kind": "mult", "query": "text", "width": 48, "depth": 1,
                                                      "heads": 2, "options": {"self_depth": 1}}},
        "objectives": {"contrastive": {"pairs": [["audio", "text"]]}, "matching": MATCHING},
    },
    "late_fusion_low_rank": {
        "model": {"family": "late_fusion", "fusion": {"kind": "low_rank", "query": "text", "width": 48,
                                                      "options": {"rank": 4}}},
        "objectives": {"contrastive": {"pairs": [["audio", "text"]]}, "matching": MATCHING},
    },
    "unified_experts": {
        "model": {"family": "unified", "unified": {"width": 48, "depth": 2, "heads": 2, "experts": True,
                                                   "fusion_depth": 1, "query": "text"}},
        "objectives": {"contrastive": {"pairs": [["audio", "text"]]}, "matching": MATCHING,
                       "mlm": {"modality": "text"}},
    },
}


def _terms(run: Path) -> dict[str, list[float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    names = [k for k in records[0] if k.startswith("loss/") and k.count("/") == 1]
    return {k: [r[k] for r in records] for k in names}


def _assert_terms_go_down(run: Path, objectives: dict[str, Any], label: str) -> None:
    terms = _terms(run)
    assert set(terms) == {f"loss/{name}" for name in objectives}
    for name, values in terms.items():
        first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
        assert last < first - 0.01 * abs(first), f"{label}: {name} did not go down ({first:.4f} -> {last:.4f})"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_on_two_ranks(family: str, asterisk_data: Path, tmp_path: Path) -> None:
    spec = FAMILIES[family]
    recipe = tiny_recipe_dict(asterisk_data, model=spec["model"],
                              train={"steps": 40, "warmup_steps": 5, "log_every": 10})
    recipe["objectives"] = spec["objectives"]
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run = tmp_path / "run"
    proc = mmssl("pretrain", str(path), "--nproc", "2", "--run-dir", str(run), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _assert_terms_go_down(run, spec["objectives"], family)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2 and summary["steps"] == 40

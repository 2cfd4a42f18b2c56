"""The retrieval benchmark at tiny sizes: every method's printed recall equals an independent brute-force Recall@K,
and the memory columns follow their definitions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmssl.tools.bench.retrieval import main, make_embeddings


def _numpy_recall(n: int, dim: int, noise: float, ks: tuple[int, ...]) -> dict[str, float]:
    q, g = (t.double().numpy() for t in make_embeddings(n, dim, noise, seed=0))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    order = np.argsort(-(q @ g.T), axis=1, kind="stable")
    ranks = np.array([int(np.nonzero(order[i] == i)[0][0]) for i in range(n)])
    return {f"R@{k}": float((ranks < k).mean()) for k in ks}


def test_table_recall_equals_brute_force(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    main(["--sizes", "60", "150", "--dim", "8", "--chunk", "16", "--brute-max", "60", "--ks", "1", "3",
          "--noise", "1.5", "--json", str(out)])
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split()
    assert header[:2] == ["N", "method"] and header[-2:] == ["R@1", "R@3"]
    table = [line.split() for line in lines[3:] if line and line[0] != "*"]
    assert [(int(r[0]), r[1]) for r in table] == [(60, "rank"), (60, "topk"), (60, "brute"), (150, "rank"),
                                                  (150, "topk")]
    for row in table:
        n = int(row[0])
        expected = _numpy_recall(n, 8, 1.5, (1, 3))
        assert 0.0 < expected["R@1"] < 1.0  # non-trivial recall at these sizes
        assert float(row[-2]) == pytest.approx(expected["R@1"], abs=1e-5)
        assert float(row[-1]) == pytest.approx(expected["R@3"], abs=1e-5)
    rows = json.loads(out.read_text())
    for r in rows:
        assert r["matrix_mb"] == pytest.approx(4 * r["n"] ** 2 / 2**20)
        assert r["added_vs_matrix"] == pytest.approx(r["added_rss_mb"] / r["matrix_mb"])
        assert r["seconds"] > 0 and r["peak_rss_mb"] >= r["added_rss_mb"] >= 0
        assert r["R@1"] == pytest.approx(_numpy_recall(r["n"], 8, 1.5, (1,))["R@1"], abs=1e-12)


def test_bad_options_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--sizes", "10", "--chunk", "0"])
    assert "--chunk must be positive, got 0" in capsys.readouterr().err

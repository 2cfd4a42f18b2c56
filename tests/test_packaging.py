"""mmssl installs as one namespace and runs from any working directory.

* ``pip install --no-deps --target DIR .`` puts ``mmssl/`` (and its metadata) into DIR and no top-level ``tools``,
  ``pretrain``, ``objectives``, ``architectures``, ``data_pipelines`` or ``recipes``; the installed copy imports,
  knows its version and lists its bundled recipes.
* ``mmssl pretrain`` started from a directory that holds its own ``tools/`` and ``pretrain/`` packages (as most ML
  repositories do) still trains: its ranks run ``-m mmssl.pretrain.worker``, and nothing of the user's is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_recipe_dict, write_recipe

ROOMS = ("tools", "pretrain", "objectives", "architectures", "data_pipelines", "recipes")


def test_install_puts_one_mmssl_package_into_site_packages(tmp_path: Path) -> None:
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    top = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info")) and p.name != "bin"}
    assert top == {"mmssl"}, top
    assert {p.name for p in (target / "mmssl").iterdir() if p.is_dir()} >= set(ROOMS)
    code = ("import mmssl, mmssl.pretrain.recipe as r; print(mmssl.__file__); print(mmssl.__version__); "
            "print(sorted(r.list_bundled_recipes())[:2])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    where, version, recipes = run.stdout.splitlines()
    assert where.startswith(str(target)) and version == "0.1.0" and recipes == "['albef', 'albef-tiny']"


@pytest.mark.distributed
def test_pretrain_runs_from_a_directory_with_its_own_tools_and_pretrain(asterisk_data: Path, tmp_path: Path) -> None:
    home = tmp_path / "user_repo"
    for name in ("tools", "pretrain"):  # the user's own packages, which would break the ranks if imported
        (home / name).mkdir(parents=True)
        (home / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} was imported')\n")
    (home / "pretrain" / "worker.py").write_text("raise SystemExit('the user\\'s pretrain.worker ran')\n")
    write_recipe(home / "r.yaml", tiny_recipe_dict(asterisk_data, train={"steps": 2}))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mmssl", "pretrain", "r.yaml", "--nproc", "2", "--run-dir", "run"],
                          cwd=home, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((home / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2

"""A real 2-rank DeepSpeed run in exact epochs on a shard set with 5 % corrupted members (`mmssl pretrain`).

* every sample key is consumed exactly once in the epoch, over 2 ranks x 2 DataLoader workers, with the uneven
  split padded (policy: rebalance + pad, `data_pipelines.epochs`);
* the run completes and summary.json lists exactly the corrupted (shard, key, member) triples, no more, no less.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest

from mmssl.data_pipelines.shards import DatasetIndex
from tests.conftest import mmssl, tiny_recipe_dict, write_recipe


def _corrupt_copy(src: Path, dst: Path, fraction: float, seed: int) -> set[tuple[str, str, str]]:
    """Copy the dataset, replacing the ``.wav`` member of ``fraction`` of the samples with random bytes (the tar
    itself stays valid); returns the corrupted ``(shard, key, member)``."""
    shutil.copytree(src, dst)
    rng = random.Random(seed)
    index = DatasetIndex.load(dst)
    keys = []
    for shard in index.shards:
        with tarfile.open(dst / shard.path) as tar:
            keys += [(shard.path, m.name.split(".", 1)[0]) for m in tar.getmembers() if m.name.endswith(".wav")]
    chosen = set(rng.sample(keys, round(fraction * len(keys))))
    for shard in index.shards:
        path = dst / shard.path
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(path, "w") as out:
            for member, data in members:
                if (shard.path, member.name.split(".", 1)[0]) in chosen and member.name.endswith(".wav"):
                    data = bytes(rng.randrange(256) for _ in range(len(data)))
                    member.size = len(data)
                out.addfile(member, io.BytesIO(data))
    return {(str(dst / p), k, "wav") for p, k in chosen}


@pytest.mark.distributed
def test_exact_epoch_with_corrupt_members_sees_each_sample_once_and_reports_exactly_the_bad_keys(
        asterisk_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    corrupted = _corrupt_copy(asterisk_data / "train", data / "train", fraction=0.05, seed=3)
    shutil.copy(asterisk_data / "spm.model", data / "spm.model")
    assert len(corrupted) == 8  # 5 % of 170
    # 170 samples over 2 ranks x 2 streams: 42 or 43 per reader, P = ceil(43 / 8) = 6 batches -> 12 steps per rank
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(
        data, data={"sampling": "exact", "num_workers": 2, "streams_per_rank": 2, "batch_size": 8, "eval": None},
        train={"steps": 12, "log_keys": True, "log_every": 4}))
    run = tmp_path / "run"
    done = mmssl("pretrain", str(recipe), "--nproc", "2", "--run-dir", str(run), timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["steps_per_exact_epoch"] == 12
    consumed = [k for r in (0, 1) for line in (run / "keys" / f"rank{r}.jsonl").read_text().splitlines()
                for k in json.loads(line)["keys"]]
    real = [k for k in consumed if k]
    index = DatasetIndex.load(data / "train")
    assert len(real) == len(set(real)) == index.total_samples == 170
    assert len(consumed) - len(real) == summary["rows_per_source"]["(padding)"] == 2 * 12 * 8 - 170
    reported = {(f["shard"], f["key"], f["member"]) for f in summary["data_faults"]}
    assert reported == corrupted
    assert summary["data_errors"] == {"decode_errors": len(corrupted)}
    assert all(f["kind"] == "decode_errors" and f["error"] for f in summary["data_faults"])
    assert all(v == v for v in [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()])

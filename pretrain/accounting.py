"""What a rank's training consumed: batches in stream order, data faults and rows per source, stream positions,
and (``train.log_keys``) the sample keys of every batch; summed over ranks for the run summary."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from mmssl.data_pipelines.batch import Batch
from mmssl.pretrain.rundir import key_log

MAX_LISTED_FAULTS = 10000


class KeyLog:
    """``keys/rank<N>.jsonl``: the sample keys of every batch consumed (``train.log_keys``)."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool, resumed_step: int) -> None:
        self.file = None
        if not enabled:
            return
        path = key_log(run_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resumed_step and path.exists():  # drop what a killed run consumed after its last checkpoint
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] < resumed_step]
        path.write_text("".join(ln + "\n" for ln in kept))
        self.file = path.open("a", buffering=1)  # line-buffered: a kill loses no finished line

    def write(self, step: int, batch: Batch) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "batch": batch.index, "keys": batch.keys}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class DataAccount:
    """Checks each batch is the one the resume position expects, and sums what the stream reported with it."""

    def __init__(self, rank: int, next_batch: int, positions: dict[int, Any], keylog: KeyLog) -> None:
        self.rank, self.next_batch, self.positions, self.keylog = rank, next_batch, positions, keylog
        self.data_errors: Counter[str] = Counter()
        self.source_rows: Counter[str] = Counter()  # rows per data source, and "(padding)" rows of exact epochs
        self.faults: dict[tuple[str, ...], dict[str, str]] = {}  # every skipped piece of data, once

    def take(self, batch: Batch, step: int) -> None:
        if batch.index != self.next_batch:
            raise RuntimeError(f"stream out of order on rank {self.rank}: got batch {batch.index}, "
                               f"expected {self.next_batch}")
        self.next_batch += 1
        for name, count in batch.stats.items():
            if name.startswith("source_rows/"):
                self.source_rows[name.split("/", 1)[1]] += count
            elif name == "padding_rows":
                self.source_rows["(padding)"] += count
            else:
                self.data_errors[name] += count
        for fault in batch.faults:
            self.faults.setdefault((fault["kind"], fault["shard"], fault["key"], fault["member"]), fault)
        if batch.position is not None:
            self.positions[int(batch.position["stream"])] = batch.position
        self.keylog.write(step, batch)

    def report(self) -> dict[str, Any]:
        """This rank's part of the summary (gathered over ranks by `merge_reports`)."""
        return {"data_errors": dict(self.data_errors), "source_rows": dict(self.source_rows),
                "faults": list(self.faults.values())}


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The run summary's data fields from every rank's `DataAccount.report`."""
    errors: Counter[str] = Counter()
    rows: Counter[str] = Counter()
    faults: dict[tuple[str, ...], dict[str, str]] = {}
    for r in reports:
        errors.update(r["data_errors"])
        rows.update(r["source_rows"])
        for f in r["faults"]:
            faults.setdefault((f["shard"], f["key"], f["member"], f["kind"]), f)
    listed = [faults[k] for k in sorted(faults)][:MAX_LISTED_FAULTS]
    return {"data_errors": dict(errors),
            # each skipped shard / sample member once (shard, key, member, kind, error), first MAX_LISTED_FAULTS
            "data_faults": listed, "data_faults_unlisted": max(0, len(faults) - len(listed)),
            "rows_per_source": dict(rows)}

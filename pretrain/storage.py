"""Where a run directory lives across nodes: on storage every rank sees, or on each node's own disk.

Multi-node users either point every node at one run directory on shared storage (NFS, Lustre, a cloud file system)
or give each node a directory on its local disk. `probe_storage` tells which, collectively, at the start of a run:
every rank writes a marker file into ``<run>/.storage-<token>/`` and lists the markers it sees; ranks that see the
same markers share a storage **domain**.

* **shared** — one domain: global rank 0 alone finalises checkpoints (renames a tag, writes ``latest``, prunes).
* **node-local** — one domain per node, each holding exactly one local rank 0, which finalises its node's copy; the
  DeepSpeed engine then writes its model-states file on every node (``checkpoint.use_node_local_storage``), so each
  node's copy holds everything its own ranks need to resume. Gathering the nodes' tag directories into one gives the
  complete checkpoint (for export).

Any other pattern (ranks that see some of a domain's markers but not all, two local ranks 0 in one node-local
domain) is refused with the sets each rank saw.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from mmssl.pretrain.errors import PretrainError

PROBE_PREFIX = ".storage-"
SHARED, NODE_LOCAL = "shared", "node-local"


class StorageError(PretrainError):
    """The run directory is shared by some ranks but not others in a way no checkpoint layout can serve."""


@dataclass(frozen=True)
class RunStorage:
    layout: str  # SHARED or NODE_LOCAL
    finaliser: bool  # this rank renames tags, writes ``latest`` and prunes for its domain
    domain: tuple[int, ...]  # the global ranks that share this rank's run directory
    domains: int  # how many copies of the run directory there are

    @property
    def node_local(self) -> bool:
        return self.layout == NODE_LOCAL


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def probe_storage(run_dir: Path) -> RunStorage:
    """The storage layout of ``run_dir`` for the current process group (collective: every rank must call)."""
    rank, world = _world()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1:
        return RunStorage(SHARED, True, (0,), 1)
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = run_dir / f"{PROBE_PREFIX}{token[0]}"
    probe.mkdir(parents=True, exist_ok=True)
    (probe / f"rank{rank}").write_text(socket.gethostname())
    dist.barrier()
    seen = tuple(sorted(int(p.name[4:]) for p in probe.glob("rank*")))
    views: list[tuple[tuple[int, ...], int] | None] = [None] * world
    dist.all_gather_object(views, (seen, local_rank))
    dist.barrier()  # every rank has listed the markers before any is removed
    storage = _layout(run_dir, rank, [v for v in views if v is not None])
    if storage.finaliser:
        shutil.rmtree(probe, ignore_errors=True)
    return storage


def _layout(run_dir: Path, rank: int, views: list[tuple[tuple[int, ...], int]]) -> RunStorage:
    seen = {r: set(v[0]) for r, v in enumerate(views)}
    local_rank = {r: v[1] for r, v in enumerate(views)}
    sets = {r: sorted(s) for r, s in seen.items()}
    for r, ranks in seen.items():
        if r not in ranks or any(seen[q] != ranks for q in ranks):
            raise StorageError(f"run directory {run_dir}: ranks see different sets of each other's files "
                               f"(rank -> ranks whose files it sees: {sets}); put it on storage every node sees, "
                               f"or on a local disk of every node")
    domains = {tuple(sorted(s)) for s in seen.values()}
    mine = tuple(sorted(seen[rank]))
    if len(domains) == 1:
        return RunStorage(SHARED, rank == 0, mine, 1)
    for domain in domains:
        heads = [r for r in domain if local_rank[r] == 0]
        if len(heads) != 1:
            raise StorageError(f"run directory {run_dir}: ranks {list(domain)} share one copy of it, holding "
                               f"{len(heads)} local rank(s) 0; node-local run directories need one copy per node "
                               f"(rank -> ranks whose files it sees: {sets})")
    return RunStorage(NODE_LOCAL, local_rank[rank] == 0, mine, len(domains))

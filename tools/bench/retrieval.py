"""Benchmark of N x N cross-modal retrieval: the chunked Recall@K of `tools.evaluation.retrieval` against the full
similarity matrix it avoids materialising.

    mmssl bench retrieval [--sizes 1000 10000 50000] [--dim 256] [--chunk 4096] [--brute-max 1000]
        [--ks 1 5 10] [--noise 4.0] [--seed 0] [--threads N] [--json out.json]

Data (seeded): ``N`` queries ``x_i ~ N(0, I_D)`` and gallery items ``y_i = x_i + σ·ε_i`` with ``ε_i ~ N(0, I_D)``;
item ``i`` is query ``i``'s only positive, so the expected cosine of a pair is about ``1 / sqrt(1 + σ²)`` against a
spread of ``1 / sqrt(D)`` for non-pairs and Recall@K falls as ``N`` grows. Methods, per size:

* ``rank``: `first_positive_rank` (two chunked passes) then `recall_at_k`;
* ``topk``: `topk_chunked` with ``k = max(ks)``, Recall@K = [item i among the first K] (one chunked pass);
* ``brute`` (only ``N ≤ --brute-max``): the whole matrix ``S = x̂ ŷᵀ`` and ``r_i = #{j ≠ i : S_ij > S_ii}``, the
  reference the other two must agree with.

Columns: wall time of the call; peak RSS of the process during the call and the part of it added over the RSS
just before (Linux: ``VmHWM`` from /proc/self/status, reset through /proc/self/clear_refs before each call;
elsewhere ``resource.getrusage().ru_maxrss``, a lifetime maximum, marked ``*``); the bytes the N x N float32 matrix
would need (``4 N²``); the ratio of the added peak to those bytes. tracemalloc is not used: it sees Python's own
allocations, not tensor storage.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmssl.tools.evaluation.retrieval import first_positive_rank, recall_at_k, topk_chunked

MB = 1024.0**2


def make_embeddings(n: int, dim: int, noise: float = 4.0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(queries [n, dim], gallery [n, dim])`` with gallery row ``i`` a noisy copy of query row ``i``."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(n, dim, generator=gen)
    gallery = query + noise * torch.randn(n, dim, generator=gen)
    return query, gallery


def brute_force_ranks(query: Tensor, gallery: Tensor) -> Tensor:
    """``r_i = #{j ≠ i : S_ij > S_ii}`` from the full cosine matrix (one positive per query, on the diagonal)."""
    sims = F.normalize(query.float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).T
    return (sims > sims.diagonal()[:, None]).sum(1)


def topk_ranks(query: Tensor, gallery: Tensor, k: int, chunk: int) -> Tensor:
    """Position of item ``i`` in query ``i``'s cosine top-k, or ``k`` when it is not there."""
    _, idx = topk_chunked(query, gallery, k, chunk)
    hit = idx == torch.arange(query.shape[0], device=idx.device)[:, None]
    return torch.where(hit.any(1), hit.int().argmax(1), torch.tensor(k)).cpu()


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _proc_status_kb("VmHWM") is not None
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def measure(fn: Callable[[], Tensor]) -> dict[str, Any]:
    """Run ``fn`` once: its result, wall seconds, peak RSS and peak RSS added over the RSS before the call."""
    gc.collect()
    reset = _reset_peak_rss()
    before_kb = _proc_status_kb("VmRSS")
    before = before_kb * 1024 if before_kb is not None else _ru_maxrss_bytes()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = _proc_status_kb("VmHWM") * 1024 if reset else _ru_maxrss_bytes()  # type: ignore[operator]
    return {"result": result, "seconds": seconds, "peak_rss_mb": peak / MB,
            "added_rss_mb": max(peak - before, 0) / MB, "peak_reset": reset}


def size_rows(n: int, dim: int, chunk: int, ks: Sequence[int], brute: bool, noise: float, seed: int
              ) -> list[dict[str, Any]]:
    """The rows of one size: ``rank`` and ``topk``, and ``brute`` when asked."""
    query, gallery = make_embeddings(n, dim, noise, seed)
    ids = torch.arange(n)
    methods: dict[str, Callable[[], Tensor]] = {
        "rank": partial(first_positive_rank, query, gallery, ids, ids, chunk=chunk),
        "topk": partial(topk_ranks, query, gallery, min(max(ks), n), chunk),
    }
    if brute:
        methods["brute"] = partial(brute_force_ranks, query, gallery)
    matrix_mb = 4.0 * n * n / MB
    rows = []
    for name, fn in methods.items():
        m = measure(fn)
        rows.append({"n": n, "dim": dim, "chunk": chunk, "method": name, "seconds": m["seconds"],
                     "peak_rss_mb": m["peak_rss_mb"], "added_rss_mb": m["added_rss_mb"],
                     "peak_reset": m["peak_reset"], "matrix_mb": matrix_mb,
                     "added_vs_matrix": m["added_rss_mb"] / matrix_mb, **recall_at_k(m["result"], ks)})
    return rows


def bench_rows(sizes: Sequence[int], dim: int = 256, chunk: int = 4096, ks: Sequence[int] = (1, 5, 10),
               brute_max: int = 1000, noise: float = 4.0, seed: int = 0) -> list[dict[str, Any]]:
    """One row per (size, method); see the module docstring."""
    return [row for n in sizes for row in size_rows(n, dim, chunk, ks, n <= brute_max, noise, seed)]


def format_table(rows: Sequence[dict[str, Any]], ks: Sequence[int] = (1, 5, 10)) -> str:
    head = (f"{'N':>7} {'method':<6} {'seconds':>9} {'peak_RSS_MB':>12} {'added_MB':>10} {'NxN_f32_MB':>11} "
            f"{'added/NxN':>10}" + "".join(f" {'R@' + str(k):>8}" for k in ks))
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = "" if r["peak_reset"] else "*"
        lines.append(f"{r['n']:>7} {r['method']:<6} {r['seconds']:>9.3f} {r['peak_rss_mb']:>11.1f}{mark or ' '}"
                     f"{r['added_rss_mb']:>10.1f} {r['matrix_mb']:>11.1f} {r['added_vs_matrix']:>10.4f}"
                     + "".join(f" {r[f'R@{k}']:>8.5f}" for k in ks))
    if any(not r["peak_reset"] for r in rows):
        lines.append("* peak RSS is the process's lifetime maximum (the high-water mark could not be reset)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--brute-max", type=int, default=1000, help="largest N given the full-matrix reference")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--noise", type=float, default=4.0, help="σ of the gallery noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    for name in ("dim", "chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if min(args.sizes) < 1 or min(args.ks) < 1:
        parser.error(f"--sizes and --ks must be positive, got {args.sizes} and {args.ks}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench_rows(args.sizes, args.dim, args.chunk, args.ks, args.brute_max, args.noise, args.seed)
    print(f"N x N retrieval, D={args.dim}, chunk={args.chunk}, noise σ={args.noise}, "
          f"{torch.get_num_threads()} threads")
    print(format_table(rows, args.ks))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

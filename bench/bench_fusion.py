"""Choosing the fusion on validation: the grid's top-k shortcut against sorting every fused list.

`components.retrieval.fusion_tuning` scores hundreds of (weights, rrf_k) points on the same lists
(4 lists: 286 weight points per constant). Two ways to get each point's top k, timed on the same
synthetic lists, point by point round-robin (load swings hit both alike):
  ours   FusionCandidates built once (the union of (query, item) pairs, their generated rank and
         slot), then per point: scores by bincount, each query's k-th score by a partition, and a
         sort of only the pairs at or above it (`FusionCandidates.top`);
  full   `fuse(...)` per point (a fresh union and a sort of every fused pair; what the choice did
         before) and `Ranked.top(k)`.
Every point's two top-k tables must be equal (`agree`). Lists imitate amazon-scientific's: a
generated list of `--generated` items per query (a beam of SIDs expanded), three dense lists of
depth 100, over 4,344 items. `ours_s` includes building the candidates once.

    .venv/bin/python bench/bench_fusion.py [--queries 2000 8317] [--points 40]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from common import print_table, write_result

from components.retrieval.fusion import FusionCandidates, Ranked, fuse, weight_grid

N_ITEMS = 4344


def lists_for(n_queries: int, generated: int, depth: int, seed: int) -> list[Ranked]:
    """One generated list (popular items more likely) and three dense lists per query, distinct items each."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.8
    out = []
    for length, p in ((generated, pop / pop.sum()), (depth, None), (depth, None), (depth, None)):
        rows = np.stack([rng.choice(N_ITEMS, length, replace=False, p=p) for _ in range(n_queries)])
        out.append(Ranked(rows.reshape(-1), np.zeros(rows.size, np.float32), np.full(n_queries, length)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, nargs="+", default=[2000, 8317])
    ap.add_argument("--points", type=int, default=40, help="grid points timed (spread over the 286 of 4 lists)")
    ap.add_argument("--generated", type=int, default=400)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    grid = [w for w in weight_grid(4) if w[0] < 1.0]
    points = [(grid[i], (20, 60)[i % 2]) for i in np.linspace(0, len(grid) - 1, args.points).astype(int)]
    rows = []
    for n in args.queries:
        lists = lists_for(n, args.generated, 100, seed=n)
        t0 = time.perf_counter()
        candidates = FusionCandidates(lists, N_ITEMS)
        build = time.perf_counter() - t0
        ours, full, agree = [], [], True
        for w, c in points:
            t0 = time.perf_counter()
            a = candidates.top(w, c, args.k)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = fuse(lists, w, c, N_ITEMS).top(args.k)
            full.append(time.perf_counter() - t0)
            agree &= bool((a == b).all())
        ours_s, full_s = build + sum(ours), sum(full)
        rows.append({"queries": n, "points": len(points), "ours_s": ours_s, "full_s": full_s,
                     "ours_per_point_ms": 1000 * float(np.median(ours)), "full_per_point_ms": 1000 * float(np.median(full)),
                     "speedup": full_s / ours_s, "agree": agree})
    print_table(rows, list(rows[0]), "fusion grid: top-k per point (ours = FusionCandidates, full = fuse + top)")
    print(write_result("fusion", {"config": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()

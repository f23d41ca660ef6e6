"""Approximate top-k by inner product for large catalogs: a faiss IVF index, built once per item matrix.

Why: the exact dense side (components/retrieval/fusion.py `dense_ranking`) multiplies every query by every
item; at a million items and ten thousand queries that is 4e12 multiply-adds. An inverted-file index
(faiss IndexIVFFlat, inner product on unit vectors = cosine) scans the `nprobe` nearest of sqrt(N) cells,
about 8x the asked depth in vectors per query. Small catalogs stay exact (DENSE_EXACT_UP_TO), so their
rankings, ties included, are unchanged; probing every cell gives the exact top k (tested).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import faiss
import numpy as np

DENSE_EXACT_UP_TO = 100_000   # items: exact search up to here, the IVF index above
TRAIN_PER_CELL = 40            # k-means training vectors per cell (faiss warns below 39)
SCAN_DEPTHS = 8                # vectors scanned per query, in multiples of the asked depth
_CACHE: OrderedDict[tuple, IvfIndex] = OrderedDict()
_CACHE_SIZE = 4                # item matrices kept indexed (a service holds a few versions' vectors)


class IvfIndex:
    """IndexIVFFlat over unit item vectors: sqrt(N) cells, trained on a seeded sample."""

    def __init__(self, item_vecs: np.ndarray, nlist: int | None = None, seed: int = 0) -> None:
        vecs = np.ascontiguousarray(item_vecs, dtype=np.float32)
        n, dim = vecs.shape
        self.nlist = nlist or max(1, int(math.sqrt(n)))
        quantizer = faiss.IndexFlatIP(dim)
        self.index = faiss.IndexIVFFlat(quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = seed
        sample = min(n, TRAIN_PER_CELL * self.nlist)
        rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False)) if sample < n else slice(None)
        self.index.train(vecs[rows])
        self.index.add(vecs)
        self.n = n

    def nprobe_for(self, depth: int) -> int:
        """Cells to scan so that about SCAN_DEPTHS x depth vectors are read per query."""
        per_cell = self.n / self.nlist
        return min(self.nlist, max(1, math.ceil(SCAN_DEPTHS * depth / per_cell)))

    def search(self, query_vecs: np.ndarray, depth: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(N, depth) item rows and scores, best first (score desc, then item row); -1 / -inf where a query's
        probed cells hold fewer than depth items."""
        self.index.nprobe = nprobe or self.nprobe_for(depth)
        scores, rows = self.index.search(np.ascontiguousarray(query_vecs, dtype=np.float32), depth)
        scores = np.where(rows >= 0, scores, -np.inf)
        order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), -scores), axis=1)
        return np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)


def ivf_index(item_vecs: np.ndarray) -> IvfIndex:
    """The index of this item matrix, built on first use and kept (keyed by the array's memory and shape)."""
    key = (item_vecs.__array_interface__["data"][0], item_vecs.shape, item_vecs.dtype.str,
           float(np.asarray(item_vecs[:: max(1, len(item_vecs) // 64)], dtype=np.float64).sum()))
    if key not in _CACHE:
        _CACHE[key] = IvfIndex(item_vecs)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return _CACHE[key]

"""Hybrid ranking: the generated candidates fused with a dense ranking (LIGER's idea).

Why: a generative retriever only returns items inside the SIDs it decodes, so tail and cold
items the decoder never learned to emit cannot surface; a dense ranking reaches every item.
Weighted reciprocal-rank fusion needs no score calibration between a beam log-probability and a
cosine: score = w / (k + generative rank) + (1 - w) / (k + dense rank), 1-based ranks, a list
an item is missing from adds nothing. w = 1 keeps the generative order, w = 0 the dense one.
The dense side is the retriever's learned item scorer (`learned`, components/item_scorer.py)
or the frozen text embeddings (`zero_shot`, the dense baseline's vectors); the source and w
are chosen on the validation split when the retriever is trained (`choose_fusion`), so the
same rule carries over to any catalog: a search catalog with strong text matching picks a
low w, a recommendation log with a sharp decoder a high one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from components.errors import ConfigError

SOURCES = ("none", "learned", "zero_shot")
WEIGHT_GRID = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 11))


@dataclass
class Ranked:
    """Flat ranked lists: per query (in query order) its item rows best first, with scores."""

    items: np.ndarray      # (total,) item rows
    scores: np.ndarray     # (total,)
    per_query: np.ndarray  # (N,) list lengths

    @property
    def query(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.per_query)), self.per_query)

    @property
    def rank(self) -> np.ndarray:
        """0-based rank of each row inside its query's list."""
        return np.arange(len(self.items)) - np.repeat(np.cumsum(self.per_query) - self.per_query, self.per_query)

    def top(self, k: int) -> np.ndarray:
        """(N, k) item rows, -1 padded."""
        out = np.full((len(self.per_query), k), -1, dtype=np.int64)
        keep = self.rank < k
        out[self.query[keep], self.rank[keep]] = self.items[keep]
        return out


def fusion_config(rp: dict) -> dict:
    """`retriever.fusion` checked: source auto | none | learned | zero_shot; weight auto | 0..1."""
    fu = dict(rp.get("fusion") or {"source": "none"})
    source, weight = str(fu.get("source", "none")), fu.get("weight", "auto")
    if source not in SOURCES + ("auto",):
        raise ConfigError("retriever.fusion.source", f"must be auto or one of {SOURCES}, got {source!r}")
    if source == "learned" and not rp.get("item_head", False):
        raise ConfigError("retriever.fusion.source", "learned needs retriever.item_head: true")
    if weight != "auto" and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1):
        raise ConfigError("retriever.fusion.weight", f"must be auto or a number in [0, 1], got {weight!r}")
    depth, k = fu.get("depth", 100), fu.get("rrf_k", 60)
    for key, value in (("depth", depth), ("rrf_k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"retriever.fusion.{key}", f"must be an integer >= 1, got {value!r}")
    return {"source": source, "weight": weight, "depth": int(depth), "rrf_k": int(k)}


def dense_ranking(query_vecs: np.ndarray, item_vecs: np.ndarray, depth: int, chunk: int = 2048) -> Ranked:
    """Top-`depth` items per query by dot product (vectors are unit length: cosine), in query chunks."""
    n, depth = len(query_vecs), min(depth, len(item_vecs))
    rows = np.empty((n, depth), dtype=np.int64)
    scores = np.empty((n, depth), dtype=np.float32)
    for s in range(0, n, chunk):
        sim = query_vecs[s: s + chunk] @ item_vecs.T
        part = np.argpartition(-sim, depth - 1, axis=1)[:, :depth] if depth < sim.shape[1] else \
            np.tile(np.arange(sim.shape[1]), (len(sim), 1))
        psim = np.take_along_axis(sim, part, 1)
        order = np.lexsort((part, -psim), axis=1)   # score desc, then item row: deterministic ties
        rows[s: s + chunk] = np.take_along_axis(part, order, 1)
        scores[s: s + chunk] = np.take_along_axis(psim, order, 1)
    return Ranked(rows.reshape(-1), scores.reshape(-1), np.full(n, depth, dtype=np.int64))


def fuse(generated: Ranked, dense: Ranked, weight: float, rrf_k: int, n_items: int) -> Ranked:
    """Weighted reciprocal-rank fusion of two ranked lists per query (ties: generative rank, then item row)."""
    q = np.concatenate([generated.query, dense.query])
    items = np.concatenate([generated.items, dense.items])
    contrib = np.concatenate([weight / (rrf_k + 1.0 + generated.rank), (1.0 - weight) / (rrf_k + 1.0 + dense.rank)])
    gen_rank = np.concatenate([generated.rank, np.full(len(dense.items), np.iinfo(np.int64).max // 2)])
    key = q.astype(np.int64) * n_items + items
    uniq, inv = np.unique(key, return_inverse=True)
    score = np.bincount(inv, weights=contrib, minlength=len(uniq))
    first_gen = np.full(len(uniq), np.iinfo(np.int64).max // 2, dtype=np.int64)
    np.minimum.at(first_gen, inv, gen_rank)
    uq, ui = uniq // n_items, uniq % n_items
    order = np.lexsort((ui, first_gen, -score, uq))
    per_query = np.bincount(uq, minlength=len(generated.per_query))
    return Ranked(ui[order], score[order].astype(np.float32), per_query)


def recall_at(ranked: Ranked, targets: np.ndarray, k: int) -> float:
    """Mean over queries with targets of the share of targets in the top k (targets (N, T), -1 padded)."""
    top = ranked.top(k)
    valid = targets >= 0
    hit = (targets[:, :, None] == top[:, None, :]).any(2) & valid
    has = valid.any(1)
    return float((hit.sum(1)[has] / valid.sum(1)[has]).mean()) if has.any() else float("nan")


def choose_fusion(generated: Ranked, dense: dict[str, Ranked], targets: np.ndarray, k: int, rrf_k: int,
                  n_items: int, weights: tuple[float, ...] = WEIGHT_GRID) -> tuple[dict, list[dict]]:
    """Best (source, weight) by validation Recall@k over the grid; generative only (w = 1) wins ties.

    Returns the choice and every grid point tried (logged by the train step)."""
    tried = [{"source": "none", "weight": 1.0, f"recall@{k}": recall_at(generated, targets, k)}]
    for source, ranking in dense.items():
        for w in weights:
            if w == 1.0:
                continue  # w = 1 is the generative list itself
            tried.append({"source": source, "weight": float(w),
                          f"recall@{k}": recall_at(fuse(generated, ranking, w, rrf_k, n_items), targets, k)})
    best = max(tried, key=lambda t: (t[f"recall@{k}"], t["source"] == "none", t["weight"]))
    return {"source": best["source"], "weight": best["weight"]}, tried

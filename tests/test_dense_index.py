"""The dense side above DENSE_EXACT_UP_TO items (issue 24): faiss IVF answers, and equals exact search when it
probes every cell."""
from __future__ import annotations

import numpy as np

from components.ranking import dense_index
from components.ranking.dense_index import IvfIndex, ivf_index
from components.retrieval.fusion import dense_ranking


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _catalog(n_items: int = 3000, n_queries: int = 120, dim: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, dim))
    items = _unit(centres[rng.integers(0, 40, n_items)] + 0.5 * rng.normal(size=(n_items, dim)))
    queries = _unit(centres[rng.integers(0, 40, n_queries)] + 0.5 * rng.normal(size=(n_queries, dim)))
    return items, queries


def test_probing_every_cell_equals_exact_search():
    items, queries = _catalog()
    exact = dense_ranking(queries, items, 50).top(50)
    index = IvfIndex(items)
    rows, scores = index.search(queries, 50, nprobe=index.nlist)
    assert (rows == exact).all() and (np.diff(scores, axis=1) <= 1e-6).all()


def test_the_default_probe_keeps_most_of_the_exact_top_k():
    items, queries = _catalog()
    exact = dense_ranking(queries, items, 50).top(50)
    rows, _ = IvfIndex(items).search(queries, 50)
    overlap = np.mean([len(set(a) & set(b)) / 50 for a, b in zip(rows, exact)])
    assert overlap >= 0.9


def test_large_catalogs_take_the_index_and_build_it_once(monkeypatch):
    items, queries = _catalog()
    exact = dense_ranking(queries, items, 20).top(20)
    monkeypatch.setattr("components.retrieval.fusion.DENSE_EXACT_UP_TO", 1000)
    built = []
    monkeypatch.setattr(dense_index, "IvfIndex", lambda vecs: built.append(1) or IvfIndex(vecs))
    monkeypatch.setattr(dense_index, "_CACHE", type(dense_index._CACHE)())
    first = dense_ranking(queries, items, 20)
    again = dense_ranking(queries[:5], items, 20)
    assert len(built) == 1 and ivf_index(items) is ivf_index(items)
    assert (first.top(20)[:5] == again.top(20)).all()
    assert np.mean([len(set(a) & set(b)) / 20 for a, b in zip(first.top(20), exact)]) >= 0.9

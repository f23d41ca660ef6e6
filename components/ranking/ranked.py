"""Exact top-k with one tie rule, and the ranked-results frame (query_id, rank, item_id, score, sid="")
of per-query top-k item rows: the baselines, the BM25 index and SASRec rank through these."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k best columns per row, best first; ties go to the lower column index.

    Exact tie rule at the cut too: all columns above the k-th value, then the lowest-index ones equal to it.
    """
    k = min(k, scores.shape[1])
    if k == 0:
        return np.zeros((len(scores), 0), dtype=np.int64), np.zeros((len(scores), 0), dtype=scores.dtype)
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
    above = scores > kth
    equal = scores == kth
    take = above | (equal & (np.cumsum(equal, axis=1) <= k - above.sum(1, keepdims=True)))
    idx = np.nonzero(take)[1].reshape(len(scores), k)
    vals = np.take_along_axis(scores, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    return idx, np.take_along_axis(vals, order, axis=1)


def ranked_frame(query_ids: Iterable[str], idx: np.ndarray, vals: np.ndarray, item_ids: np.ndarray) -> pd.DataFrame:
    """Build the ranked-results frame from per-query top-k item rows and scores."""
    qids = np.asarray(list(query_ids), dtype=object)
    n_q, k = idx.shape
    return pd.DataFrame({
        "query_id": np.repeat(qids, k),
        "rank": np.tile(np.arange(k, dtype=np.int64), n_q),
        "item_id": np.asarray(item_ids, dtype=object)[idx.ravel()],
        "score": vals.ravel().astype(float),
        "sid": "",
    })

"""Recommendation without the user's own items: a history query's ranking minus its history.

`eval.exclude_history` does this offline (metrics.drop_history_items, ranks closed up); the
service (`serve.exclude_history`, or a request's `exclude_history`) and `sa2crq candidates` do the
same, and also keep k items: a query that lost items to the exclusion and has fewer than k left
is decoded again with its beam widened by its number of distinct history items (a wider beam
holds at least that many more items), so the answer is still k items when the catalog has them.
`kept_rows` and `wider_beam` are the rule; the service's engine applies them to its arrays (a
few microseconds a request, where pandas costs a millisecond), `exclude_history` to a frame.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

# decode(queries, beam) -> ranked items of those queries (query_id, rank, item_id, score, sid), query by query
Decode = Callable[[pd.DataFrame, int], pd.DataFrame]


def kept_rows(item_ids: Sequence[str], seen: set[str]) -> np.ndarray:
    """Positions of the items of one ranking (best first) that are not in `seen`."""
    return np.fromiter((i for i, item in enumerate(item_ids) if item not in seen), np.int64)


def wider_beam(kept: int, had: int, k: int, beam: int, seen: set[str]) -> int | None:
    """The beam to decode a query again with when the exclusion took items and left fewer than k; None: keep it."""
    return beam + len(seen) if kept < min(k, had) else None


def exclude_history(ranked: pd.DataFrame, queries: pd.DataFrame, k: int, beam: int, decode: Decode) -> pd.DataFrame:
    """`ranked` (query by query, best first) with each query's own history items removed, at most k
    items a query, ranks renumbered from 0; a query left short is decoded again by `decode`, wider."""
    if ranked.empty:
        return ranked
    history = dict(zip(queries["query_id"].astype(str), map(set, queries["history"])))
    blocks = dict(tuple(ranked.groupby("query_id", sort=False)))
    again: dict[int, list[str]] = defaultdict(list)
    for qid, block in blocks.items():
        seen = history.get(qid, set())
        rows = kept_rows(block["item_id"].tolist(), seen)
        width = wider_beam(len(rows), len(block), k, beam, seen)
        if width is not None:
            again[width].append(qid)
        blocks[qid] = block.iloc[rows[:k]]
    for width, ids in again.items():
        for qid, block in decode(queries[queries["query_id"].astype(str).isin(ids)], width).groupby("query_id"):
            blocks[qid] = block.iloc[kept_rows(block["item_id"].tolist(), history[qid])[:k]]
    out = pd.concat(blocks.values(), ignore_index=True)
    return out.assign(rank=out.groupby("query_id", sort=False).cumcount().astype(np.int64))

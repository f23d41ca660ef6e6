"""Query rows as the rankers read them (prepared/queries.parquet): text or history, and the item rows
of a history. Shared by the BM25 query texts, the dense baselines and the two-tower baseline."""
from __future__ import annotations

import numpy as np
import pandas as pd

from components.runtime.errors import DataError

QUERIES_FILE = "prepared/queries.parquet"


def check_queries(queries: pd.DataFrame) -> pd.Series:
    """True for text queries; DataError for a query with neither text nor history."""
    is_text = queries["text"].notna() & (queries["text"].astype(str).str.len() > 0)
    no_hist = queries["history"].map(len) == 0
    bad = ~is_text & no_hist
    if bad.any():
        raise DataError(QUERIES_FILE, "query has neither text nor history", column="history",
                        rows=queries.index[bad])
    return is_text


def item_rows(items: pd.DataFrame) -> dict[str, int]:
    return {item_id: row for row, item_id in enumerate(items["item_id"])}


def history_rows(queries: pd.DataFrame, rows: dict[str, int], last_n: int) -> list[np.ndarray]:
    """Item rows of each query's last `last_n` history items (oldest first)."""
    out = []
    for label, hist in zip(queries.index, queries["history"]):
        tail = list(hist)[-last_n:]
        missing = [h for h in tail if h not in rows]
        if missing:
            raise DataError(QUERIES_FILE, f"history item {missing[0]!r} is not in prepared/items.parquet",
                            column="history", rows=[label])
        out.append(np.array([rows[h] for h in tail], dtype=np.int64))
    return out

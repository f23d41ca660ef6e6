"""Non-generative baselines: BM25, zero-shot dense (MiniLM cosine) and most-popular.

Each returns a ranked-results frame (query_id, rank, item_id, score, sid="") with the top
`k` items per query. Ties are broken by item row order (items.parquet), so results are
deterministic. History items are not removed from the candidates (as in TIGER's protocol).

Query construction:
- text queries: BM25 on the query text; dense on embeddings/queries.npy row `emb_row`.
- history queries: BM25 on the concatenated text of the last `bm25_history` history items
  (newest last); dense on the L2-normalised mean of the last `dense_history` item embeddings.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from tqdm import tqdm

from components.ranking.bm25 import Bm25Index, bm25_query_texts
from components.ranking.queries import QUERIES_FILE, check_queries, history_rows, item_rows
from components.ranking.ranked import ranked_frame, top_k
from components.runtime.errors import DataError


def _concat(parts: list[pd.DataFrame], item_ids: np.ndarray) -> pd.DataFrame:
    if not parts:
        return ranked_frame([], np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0)), item_ids)
    return pd.concat(parts, ignore_index=True)


def query_vectors(queries: pd.DataFrame, items: pd.DataFrame, item_emb: np.ndarray, query_emb: np.ndarray | None,
                  last_n: int = 5) -> np.ndarray:
    """One L2-normalised vector per query: text embedding, or mean of the last `last_n` history items."""
    is_text = check_queries(queries).to_numpy()
    vecs = np.zeros((len(queries), item_emb.shape[1]), dtype=np.float32)
    if is_text.any():
        if query_emb is None:
            raise DataError("embeddings/queries.npy", "text queries need query embeddings")
        rows = queries.loc[is_text, "emb_row"].to_numpy()
        bad = (rows < 0) | (rows >= len(query_emb))
        if bad.any():
            raise DataError(QUERIES_FILE, f"emb_row outside embeddings/queries.npy ({len(query_emb)} rows)",
                            column="emb_row", rows=queries.index[is_text][bad])
        vecs[is_text] = query_emb[rows]
    if (~is_text).any():
        hist = history_rows(queries[~is_text], item_rows(items), last_n)
        vecs[~is_text] = np.stack([item_emb[h].mean(axis=0) for h in hist])
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs / np.maximum(norms, 1e-12)


def dense_search(query_vecs: np.ndarray, item_vecs: np.ndarray, query_ids: Iterable[str], item_ids: np.ndarray,
                 k: int, chunk: int = 1024) -> pd.DataFrame:
    """Exact inner-product search (cosine for normalised vectors), in query chunks."""
    qids = list(query_ids)
    parts = []
    for start in tqdm(range(0, len(qids), chunk), desc="dense search", leave=False, disable=len(qids) <= chunk):
        scores = query_vecs[start:start + chunk] @ item_vecs.T
        idx, vals = top_k(scores, k)
        parts.append(ranked_frame(qids[start:start + chunk], idx, vals, item_ids))
    return _concat(parts, item_ids)


def dense_zero_shot(queries: pd.DataFrame, items: pd.DataFrame, item_emb: np.ndarray, query_emb: np.ndarray | None,
                    k: int, last_n: int = 5) -> pd.DataFrame:
    """Zero-shot dense retrieval with the frozen MiniLM embeddings."""
    qv = query_vectors(queries, items, item_emb, query_emb, last_n)
    return dense_search(qv, item_emb, queries["query_id"], items["item_id"].to_numpy(), k)


def bm25(queries: pd.DataFrame, items: pd.DataFrame, k: int, last_n: int = 3) -> pd.DataFrame:
    """The BM25 baseline: `Bm25Index` over item text, queried with `bm25_query_texts`."""
    idx, vals = Bm25Index(items["text"]).top(bm25_query_texts(queries, items, last_n), k)
    return ranked_frame(queries["query_id"].tolist(), idx, vals, items["item_id"].to_numpy())


def most_popular(queries: pd.DataFrame, items: pd.DataFrame, k: int) -> pd.DataFrame:
    """The same list for every query: training popularity, then item_id."""
    order = items.sort_values(["popularity", "item_id"], ascending=[False, True], kind="stable")
    top = order.head(k)
    n_q, kk = len(queries), len(top)
    return pd.DataFrame({
        "query_id": np.repeat(queries["query_id"].to_numpy(dtype=object), kk),
        "rank": np.tile(np.arange(kk, dtype=np.int64), n_q),
        "item_id": np.tile(top["item_id"].to_numpy(dtype=object), n_q),
        "score": np.tile(top["popularity"].to_numpy(dtype=float), n_q),
        "sid": "",
    })


# ---- runners (components/baselines/registry.py): (params, EvalInputs, k) -> ranked frame -------------
def run_bm25(params: dict, data, k: int) -> pd.DataFrame:
    """The `bm25` baseline on the test queries (eval.bm25_history: history items whose text is the query)."""
    return bm25(data.test, data.items, k, last_n=int(params["eval"]["bm25_history"]))


def run_dense(params: dict, data, k: int) -> pd.DataFrame:
    """The `dense` baseline on the test queries (eval.dense_history: history items averaged into the query)."""
    return dense_zero_shot(data.test, data.items, data.item_emb, data.query_emb, k,
                           last_n=int(params["eval"]["dense_history"]))


def run_popular(params: dict, data, k: int) -> pd.DataFrame:
    """The `popular` baseline: the same most popular items for every test query."""
    return most_popular(data.test, data.items, k)

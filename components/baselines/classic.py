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

from components.runtime.errors import DataError

QUERIES_FILE = "prepared/queries.parquet"


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


def _concat(parts: list[pd.DataFrame], item_ids: np.ndarray) -> pd.DataFrame:
    if not parts:
        return ranked_frame([], np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0)), item_ids)
    return pd.concat(parts, ignore_index=True)


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


def bm25_query_texts(queries: pd.DataFrame, items: pd.DataFrame, last_n: int = 3) -> list[str]:
    """Query text for BM25: the text itself, or the last `last_n` history items' text joined."""
    is_text = check_queries(queries).to_numpy()
    texts = items["text"].astype(str).to_numpy()
    out = [str(t) if flag else "" for t, flag in zip(queries["text"], is_text)]
    hist_pos = np.flatnonzero(~is_text)
    for pos, rows in zip(hist_pos, history_rows(queries.iloc[hist_pos], item_rows(items), last_n)):
        out[pos] = " ".join(texts[rows])
    return out


class Bm25Index:
    """BM25 (bm25s, Lucene variant, English stopwords) over item text, indexed once.

    Why a class: the BM25 baseline and the retriever's lexical fusion list (components/retrieval/fusion.py)
    rank with the same index and the same query texts; a service builds it once per version."""

    def __init__(self, texts: Iterable[str]) -> None:
        import bm25s

        self._bm25s = bm25s
        texts = [str(t) for t in texts]
        self.n_items = len(texts)
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def top(self, texts: list[str], k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """(N, k) item rows and scores per query text, best first (ties: lower row); "" scores 0 everywhere."""
        tokens = self._bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
        k = min(k, self.n_items)
        idx, vals = np.zeros((len(texts), k), np.int64), np.zeros((len(texts), k), np.float32)
        for start in tqdm(range(0, len(texts), chunk), desc="bm25", leave=False, disable=len(texts) <= chunk):
            block = tokens[start:start + chunk]
            scores = np.stack([self.retriever.get_scores(t) if t else np.zeros(self.n_items, np.float32)
                               for t in block])
            idx[start:start + len(block)], vals[start:start + len(block)] = top_k(scores, k)
        return idx, vals


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

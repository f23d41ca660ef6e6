"""BM25 over item text: the index and the query texts that the BM25 baseline and the retriever's
lexical fusion list (components/retrieval/fusion.py) share."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from tqdm import tqdm

from components.ranking.queries import check_queries, history_rows, item_rows
from components.ranking.ranked import top_k


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

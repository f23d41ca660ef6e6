"""The checks a retrain must pass before promotion: recall of old items before / after, new items' recall.

Query sets (seeded samples, sizes from params flows.retrain):
- old test queries (prepared/queries.parquet, split test);
- old items' indexing queries: the item as its own query (a one-item history, or its text for
  text datasets), target = the item; the same kind of pair the retriever is trained on;
- new items' indexing queries (there are no queries that target them yet).
Recall@K is item-level (components.ranking.metrics) over the retriever's generated ranking alone
(components.retrieval.retrieve.generated_ranking, no fusion): the fusion's text lists (zero-shot, BM25) find an
item from its own text whatever the retriever learned, so they would hide what fine-tuning changed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from components.ranking.metrics import per_query_metrics, target_pairs, target_ranks
from components.retrieval.retrieve import decode_queries, generated_ranking, group_order, ranked_frame


def index_queries(items: pd.DataFrame, item_ids: list[str], history_kind: bool) -> pd.DataFrame:
    """One query per item whose only target is that item (query_id `index:<item_id>`)."""
    texts = items.set_index("item_id")["text"]
    ids = [str(i) for i in item_ids]
    return pd.DataFrame({
        "query_id": [f"index:{i}" for i in ids],
        "split": "test",
        "order": np.arange(len(ids), dtype=np.int64),
        "history": [[i] if history_kind else [] for i in ids],
        "text": [None if history_kind else str(texts[i]) for i in ids],
        "targets": [[i] for i in ids],
        "emb_row": np.full(len(ids), -1, dtype=np.int64),
    })


def uses_history(queries: pd.DataFrame) -> bool:
    """Items are indexed as one-item histories when the data has history queries (as in training)."""
    return bool((queries["history"].map(len) > 0).any())


def sample_rows(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """At most n rows, a seeded sample in the original order (all rows when n <= 0)."""
    if n <= 0 or len(df) <= n:
        return df
    keep = np.sort(np.random.default_rng(seed).choice(len(df), n, replace=False))
    return df.iloc[keep]


def recall_at(params: dict, queries: pd.DataFrame, items: pd.DataFrame, k: int, out_dir: Path,
              model=None) -> float:
    """Mean item-level recall@k of the generated ranking of the retriever in out_dir (or `model`) over `queries`."""
    if queries.empty:
        return float("nan")
    dec = decode_queries(params, queries, model=model, beam=int(params["retriever"]["eval_beam"]), out_dir=out_dir)
    ranked = ranked_frame(dec.query_ids, generated_ranking(dec, group_order(params)), dec.catalog)
    ranks = target_ranks(ranked, target_pairs(queries, items))
    return float(per_query_metrics(ranks, [k])[f"recall@{k}"].mean())


def decide(checks: dict, max_old_drop: float, min_new_recall: float) -> tuple[bool, str]:
    """Promote only if SIDs are stable, old recall fell by at most max_old_drop on every old
    query set, and the new items reach min_new_recall; otherwise say which check failed."""
    if not checks["sids_stable"]:
        return False, "issued SIDs changed"
    for name in ("old_test", "old_index"):
        c = checks.get(name)
        if c and np.isfinite(c["drop"]) and c["drop"] > max_old_drop:
            return False, (f"{name} recall@{checks['k']} fell by {c['drop']:.4f} "
                           f"({c['before']:.4f} -> {c['after']:.4f}), more than max_old_recall_drop={max_old_drop}")
    new = checks["new_index"]["after"]
    if np.isfinite(new) and new < min_new_recall:
        return False, f"new items' recall@{checks['k']} {new:.4f} is below min_new_recall={min_new_recall}"
    return True, "all checks passed"

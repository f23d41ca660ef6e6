"""The `SASRec + text + fusion` row (issue 23 item 3): SASRec + text's ranking fused with the zero-shot dense
ranking and BM25 by the retriever's validation-chosen weighted reciprocal-rank fusion.

Why: the strongest non-generative hybrid a user could build from our parts, so the fused SA2CRQ is
measured against a hybrid of equal make, not against its parts alone. Everything is reused:
- the SASRec + text fit of the `sasrec_text` row (components/baselines/sasrec.py `fitted_sasrec`, cached
  per process, so the evaluate step trains it once for both rows);
- the `dense` baseline's query vectors (eval.dense_history) and the `bm25` baseline's index and query texts
  (eval.bm25_history), ranked as the retriever's zero_shot and bm25 fusion sources rank them;
- `components.retrieval.fusion.choose_fusion` with SASRec + text in the generated slot (first list):
  weights on the 0.1 grid and each retriever.fusion.rrf_k, chosen by the retriever's validation objective
  (retriever.fusion.objective, as fusion_tuning.tune_fusion) on every validation query (history items kept,
  as in the retriever's choice), then applied to the test queries. Each point's recall is measured at the
  objective's K alone (eval.budgets for "balanced"): the same choice, at about 0.3 s a point on amazon
  (8,317 validation queries, lists 500 deep) where recall at K=500 too costs about 3 s. retriever.fusion's
  weights and use_generated belong to the retriever's own sources and are not read here.
Every list is ranked to depth max(k, fusion_config's depth) on validation and test alike (the choice sees
the lists the test fuses), so the fused list reaches the evaluation's depth k.

Queries without a history (text queries): SASRec has nothing to read, so their SASRec list is empty and
they are fused from dense and BM25 alone (an item a list misses gets no share of its weight); the
validation choice sees the same mix of queries as the test. Where SASRec + text does not apply (no
histories to train or validate on, no test query with a history) the row is skipped (None), as sasrec's.
The choice (weights, rrf_k, the validation objective and recalls, the grid tried) is logged and kept in
the frame's attrs["sasrec_text_fusion"]; the evaluation keeps only the metrics.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from components.baselines.classic import query_vectors
from components.baselines.registry import baseline_label
from components.baselines.sasrec import FittedSASRec, fitted_sasrec, history_queries
from components.ranking.bm25 import Bm25Index, bm25_query_texts
from components.ranking.queries import item_rows
from components.retrieval.fusion import Ranked, choose_fusion, dense_ranking, fuse, fusion_config
from components.runtime.errors import DataError

log = logging.getLogger("sa2crq.sasrec_fusion")

NAME = "sasrec_text_fusion"
SOURCES = ("sasrec_text", "zero_shot", "bm25")  # the lists fused, SASRec + text first (choose_fusion's generated slot)


def flat(idx: np.ndarray, scores: np.ndarray) -> Ranked:
    """(N, depth) item rows and scores, best first, as a fusion list."""
    return Ranked(idx.reshape(-1).astype(np.int64), scores.reshape(-1).astype(np.float32),
                  np.full(len(idx), idx.shape[1], dtype=np.int64))


def sasrec_list(fit: FittedSASRec, queries: pd.DataFrame, depth: int) -> Ranked:
    """SASRec + text's top `depth` per query with a history; an empty list for the others."""
    has = (queries["history"].map(len) > 0).to_numpy()
    counts = np.where(has, min(depth, len(fit.rows)), 0).astype(np.int64)
    if not has.any():
        return Ranked(np.zeros(0, np.int64), np.zeros(0, np.float32), counts)
    part = flat(*fit.rank(history_queries(queries), depth))
    return Ranked(part.items, part.scores, counts)


def fusion_lists(params: dict, data, queries: pd.DataFrame, fit: FittedSASRec, lexical: Bm25Index,
                 depth: int) -> list[Ranked]:
    """SASRec + text, zero-shot dense and BM25 rankings of `queries`, each `depth` deep, in SOURCES' order."""
    ev = params["eval"]
    vecs = query_vectors(queries, data.items, data.item_emb, data.query_emb, int(ev["dense_history"]))
    bm25_rows, bm25_scores = lexical.top(bm25_query_texts(queries, data.items, int(ev["bm25_history"])), depth)
    return [sasrec_list(fit, queries, depth), dense_ranking(vecs, data.item_emb, depth), flat(bm25_rows, bm25_scores)]


def target_rows(queries: pd.DataFrame, rows: dict[str, int]) -> np.ndarray:
    """(N, T) target item rows per query, -1 padded (choose_fusion's targets)."""
    width = max([len(t) for t in queries["targets"]] + [1])
    out = np.full((len(queries), width), -1, dtype=np.int64)
    for pos, (label, targets) in enumerate(zip(queries.index, queries["targets"])):
        missing = [t for t in targets if t not in rows]
        if missing:
            raise DataError("prepared/queries.parquet", f"target {missing[0]!r} is not in prepared/items.parquet",
                            column="targets", rows=[label])
        out[pos, :len(targets)] = [rows[t] for t in targets]
    return out


def fused_frame(query_ids: pd.Series, fused: Ranked, item_ids: np.ndarray, k: int) -> pd.DataFrame:
    """The ranked-results frame of a fused list, cut to `k` items per query."""
    keep = fused.rank < k
    return pd.DataFrame({
        "query_id": np.asarray(query_ids, dtype=object)[fused.query[keep]],
        "rank": fused.rank[keep].astype(np.int64),
        "item_id": np.asarray(item_ids, dtype=object)[fused.items[keep]],
        "score": fused.scores[keep].astype(float),
        "sid": "",
    })


def run_sasrec_text_fusion(params: dict, data, k: int, weights: list[float] | None = None) -> pd.DataFrame | None:
    """The `sasrec_text_fusion` baseline's runner (components/baselines/registry.py): top-k test results of
    SASRec + text fused with dense and BM25; None (logged) where SASRec + text does not apply.

    `weights` (one per SOURCES, summing to 1) fixes the weights instead of choosing them on validation
    (rrf_k is still chosen); the choice is in attrs["sasrec_text_fusion"].
    """
    fit = fitted_sasrec(params, data, text=True)
    if fit is None:
        log.warning("%s row skipped: SASRec + text does not apply to dataset %s", baseline_label(NAME),
                    params.get("dataset"))
        return None
    fu = fusion_config(params)
    depth, n_items = max(int(k), int(fu["depth"])), len(data.items)
    lexical = Bm25Index(data.items["text"])
    valid = data.valid
    first, *others = fusion_lists(params, data, valid, fit, lexical, depth)
    report = list(params["eval"]["budgets"]) if fu["objective"] == "balanced" else None
    chosen, rrf_k, tried = choose_fusion(first, dict(zip(SOURCES[1:], others)), target_rows(valid, item_rows(data.items)),
                                         fu["objective"], fu["rrf_k"], n_items, weights, report=report)
    fused = fuse(fusion_lists(params, data, data.test, fit, lexical, depth), chosen, rrf_k, n_items)
    frame = fused_frame(data.test["query_id"], fused, data.items["item_id"].to_numpy(), k)
    best = next(t for t in tried if t["rrf_k"] == rrf_k and list(t["weights"].values()) == chosen)
    val = {key: value for key, value in best.items() if key.startswith("recall@") or key == "objective"}
    record = {"row": baseline_label(NAME), "seed": int(params["seed"]), "weights": dict(zip(SOURCES, chosen)),
              "rrf_k": rrf_k, "val": val, "depth": depth, "valid_queries": len(valid), "tried": tried}
    frame.attrs[NAME] = record
    log.info("%s: weights %s, rrf_k %s, valid %s (%d points tried)", record["row"], record["weights"], rrf_k,
             {key: round(value, 4) for key, value in val.items()}, len(tried))
    return frame


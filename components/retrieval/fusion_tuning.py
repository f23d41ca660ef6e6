"""Choose the fusion (sources' weights and the reciprocal-rank constant) on the validation split, once, after training.

The choice is stored in the checkpoint's config, so `retrieve`, the evaluation, the candidates
flow and serving all rank the same way without re-tuning; the grid tried is written to
metrics/retriever_train.json so the choice can be read back.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from components.retrieval.fusion import choose_fusion, fusion_config
from components.retrieval.retrieve import decode_queries, dense_side, generated_ranking
from components.retrieval.retriever import RetrieverModel


def tune_fusion(params: dict, net: RetrieverModel, valid: pd.DataFrame) -> tuple[dict | None, list[dict]]:
    """The fusion for `net` by the validation objective (retriever.fusion.objective; None: no fusion asked
    for), and the grid tried."""
    fu = fusion_config(params)
    if not fu["sources"] or valid.empty:
        return None, []
    dec = decode_queries(params, valid, model=net, beam=int(params["retriever"]["fusion"]["beam"]))
    dense = {s: dense_side(dec, s, fu["depth"], fu["bm25_history"]) for s in fu["sources"]}
    weights, rrf_k, grid = choose_fusion(generated_ranking(dec), dense, dec.dataset.ex.targets, fu["objective"],
                                         fu["rrf_k"], len(dec.catalog.item_ids),
                                         None if fu["weights"] == "auto" else fu["weights"], fu["use_generated"],
                                         report=list(params["eval"]["budgets"]))
    chosen = {"sources": fu["sources"], "weights": weights, "depth": fu["depth"], "rrf_k": rrf_k}
    if "bm25" in fu["sources"]:
        chosen["bm25_history"] = fu["bm25_history"]
    if not fu["use_generated"]:
        chosen["use_generated"] = False
    return chosen, grid


def validation_queries(queries: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    """The validation queries the train step decodes (the same seeded subset as its per-epoch check)."""
    valid = queries[queries["split"] == "valid"]
    if cap and len(valid) > cap:
        valid = valid.iloc[np.sort(np.random.default_rng(seed).choice(len(valid), cap, replace=False))]
    return valid

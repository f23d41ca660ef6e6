"""Issue 23 item 3: the `SASRec + text + fusion` row, SASRec + text's ranking fused with dense and BM25 by the
retriever's validation-chosen reciprocal-rank fusion (components/baselines/sasrec_fusion.py).

Fast: the registration, the text-query rule (no SASRec list: dense and BM25 alone) and the text-only skip.
Slow (cornac SASRec on the smoke data): the row through evaluate_all with k items per query, SASRec + text
fitted once for both rows, the chosen weights the best of the grid on validation (and that figure the
evaluation's own recall of the fused validation lists), weights (1, 0, 0) giving SASRec + text's ranking.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from components.baselines import sasrec as sasrec_mod
from components.baselines import sasrec_fusion as fusion_row
from components.baselines.registry import baseline_label, get_baseline
from components.evaluation import evaluate as evaluate_mod
from components.ranking.bm25 import Bm25Index
from components.ranking.queries import item_rows
from components.retrieval.fusion import fuse, fusion_config, weight_grid
from components.runtime.config import deep_merge, load_params

ROOT = Path(__file__).resolve().parents[2]
NAME = "sasrec_text_fusion"


def _tiny(n_items: int = 8) -> SimpleNamespace:
    """EvalInputs-shaped data: items with text and unit vectors, two history queries and two text queries."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n_items, 6)).astype(np.float32)
    items = pd.DataFrame({"item_id": [f"i{j}" for j in range(n_items)],
                          "text": [f"item {j} word{j % 3} thing{j % 2}" for j in range(n_items)]})
    queries = pd.DataFrame({"query_id": ["h0", "t0", "h1", "t1"], "history": [["i1", "i2"], [], ["i3"], []],
                            "text": [None, "word1 thing0", None, "word2"], "targets": [["i4"], ["i1"], ["i5"], ["i2"]],
                            "emb_row": [-1, 0, -1, 1]})
    return SimpleNamespace(items=items, item_emb=emb / np.linalg.norm(emb, axis=1, keepdims=True),
                           query_emb=rng.normal(size=(2, 6)).astype(np.float32), queries=queries)


def test_the_row_is_registered_and_in_the_default_baselines():
    b = get_baseline(NAME)
    assert b.row == "SASRec + text + fusion" and b.seeded
    assert set(b.reads) == {"sasrec", "bm25_history", "dense_history"}
    assert load_params(ROOT / "params.yaml")["eval"]["baselines"][-1] == NAME


def test_a_fusion_setting_reruns_the_fused_row_but_not_plain_sasrec():
    """The row reads retriever.fusion (objective, rrf_k, depth): it is in its comparison run key, and only in its."""
    from flows.compare import baseline_keys

    base = load_params(ROOT / "params.yaml")
    moved = deep_merge(base, {"retriever": {"fusion": {"objective": {"recall@500": 1.0}}}})
    assert baseline_keys(moved, NAME) != baseline_keys(base, NAME)
    assert baseline_keys(moved, "sasrec_text") == baseline_keys(base, "sasrec_text")


def test_text_queries_have_no_sasrec_list_and_fuse_dense_and_bm25_alone(smoke_params):
    """A stub SASRec ranks history queries only; text queries' fused order is dense + BM25's own fusion."""
    tiny = _tiny()
    asked: list[list[str]] = []

    def rank(queries: pd.DataFrame, depth: int) -> tuple[np.ndarray, np.ndarray]:
        asked.append(list(queries["query_id"]))
        idx = np.tile(np.arange(len(tiny.items))[::-1][:depth], (len(queries), 1))
        return idx, -np.arange(depth, dtype=np.float32)[None].repeat(len(queries), 0)

    fit = SimpleNamespace(rows=item_rows(tiny.items), rank=rank)
    lists = fusion_row.fusion_lists(smoke_params, tiny, tiny.queries, fit, Bm25Index(tiny.items["text"]), depth=5)
    assert asked == [["h0", "h1"]]
    assert lists[0].per_query.tolist() == [5, 0, 5, 0] and len(lists[0].items) == 10
    assert all(r.per_query.tolist() == [5, 5, 5, 5] for r in lists[1:])
    weights = [0.5, 0.3, 0.2]
    fused = fuse(lists, weights, 60, len(tiny.items))
    alone = fuse([lists[1], lists[2]], [0.6, 0.4], 60, len(tiny.items))   # the same ratio without SASRec's list
    for q in (1, 3):   # t0, t1
        assert fused.top(5)[q].tolist() == alone.top(5)[q].tolist()
    assert fused.top(5)[0].tolist() != alone.top(5)[0].tolist()   # a history query does read SASRec's list


def test_a_text_only_dataset_has_no_row(smoke_params):
    tiny = _tiny()
    text = tiny.queries[tiny.queries["text"].notna()]
    data = SimpleNamespace(items=tiny.items, item_emb=tiny.item_emb, query_emb=tiny.query_emb,
                           train=text.assign(order=0), valid=text, test=text)
    assert fusion_row.run_sasrec_text_fusion(smoke_params, data, 5) is None


@pytest.fixture(scope="module")
def smoke_data(smoke_embedded):
    return smoke_embedded, evaluate_mod.load_eval_inputs(smoke_embedded)


@pytest.mark.slow
def test_both_rows_in_one_process_fit_sasrec_text_once_and_rank_k_items(smoke_data, monkeypatch):
    params, data = smoke_data
    monkeypatch.setattr(sasrec_mod, "FIT_CACHE", OrderedDict())
    fits: list[bool] = []
    real_fit = sasrec_mod.fit_sasrec

    def counting_fit(train_set, val_fn, cfg, seed, text, metric):
        fits.append(text is not None)
        return real_fit(train_set, val_fn, cfg, seed, text, metric)

    monkeypatch.setattr(sasrec_mod, "fit_sasrec", counting_fit)
    results, _ = evaluate_mod.evaluate_all(params, data, ["sasrec_text", NAME], generative=False)
    assert list(results) == ["SASRec + text", baseline_label(NAME)]
    assert fits == [True]
    k = evaluate_mod.fetch_depth(params)
    frame = evaluate_mod.run_baseline(NAME, params, data)
    assert fits == [True]   # a third row in the same process: still the one fit
    assert set(frame["query_id"]) == set(data.test["query_id"])
    per_query = frame.groupby("query_id").size()
    assert per_query.eq(min(k, len(data.items))).all()
    assert frame.groupby("query_id")["item_id"].nunique().eq(per_query).all()
    assert frame.groupby("query_id")["rank"].apply(lambda r: r.tolist() == list(range(len(r)))).all()
    for group in ("overall", "head", "tail"):
        assert results[baseline_label(NAME)][group]["n_queries"] == results["SASRec + text"][group]["n_queries"]


@pytest.mark.slow
@pytest.mark.parametrize("balanced", [False, True])
def test_the_chosen_weights_are_the_best_of_the_grid_on_validation(smoke_data, balanced):
    """Under the retriever's objective, set in retriever.fusion: the mean of the smoke budgets' recalls, or
    "balanced" (each budget's recall over the grid's best there)."""
    params, data = smoke_data
    budgets = [int(b) for b in params["eval"]["budgets"]]
    objective = "balanced" if balanced else {f"recall@{b}": 1 / len(budgets) for b in budgets}
    params = deep_merge(params, {"retriever": {"fusion": {"objective": objective}}})
    k = evaluate_mod.fetch_depth(params)
    info = fusion_row.run_sasrec_text_fusion(params, data, k).attrs[NAME]
    fu = fusion_config(params)
    tried = info["tried"]
    assert len(tried) == len(weight_grid(3)) * len(fu["rrf_k"])
    assert {t["rrf_k"] for t in tried} == set(fu["rrf_k"])
    best = max(t["objective"] for t in tried)
    assert info["val"]["objective"] == best
    chosen = list(info["weights"].values())
    assert abs(sum(chosen) - 1) < 1e-9 and info["rrf_k"] in fu["rrf_k"]
    # the recorded figures are the evaluation's own recall of the validation lists fused with the choice
    fit = sasrec_mod.fitted_sasrec(params, data, text=True)
    lists = fusion_row.fusion_lists(params, data, data.valid, fit, Bm25Index(data.items["text"]), info["depth"])
    fused = fuse(lists, chosen, info["rrf_k"], len(data.items))
    recalls = {}
    for at in budgets:
        top = fused.top(at)
        assert (top >= 0).all()
        recalls[at] = sasrec_mod.mean_metrics(top, data.valid, data.items, at)["recall"]
        assert info["val"][f"recall@{at}"] == pytest.approx(recalls[at], abs=1e-12)
    scale = {at: max(t[f"recall@{at}"] for t in tried) if balanced else 1.0 for at in budgets}
    assert len(budgets) > 1
    assert np.mean([recalls[at] / scale[at] for at in budgets]) == pytest.approx(best, abs=1e-12)
    # and SASRec + text alone (weights (1, 0, 0)) is one of the points, no better than the choice
    alone = [t for t in tried if t["weights"]["generated"] == 1.0]
    assert alone and all(t["objective"] <= best for t in alone)


@pytest.mark.slow
def test_weights_one_zero_zero_give_sasrec_text_s_own_ranking(smoke_data):
    params, data = smoke_data
    k = evaluate_mod.fetch_depth(params)
    own = sasrec_mod.run_sasrec_text(params, data, k)
    fused = fusion_row.run_sasrec_text_fusion(params, data, k, weights=[1.0, 0.0, 0.0])
    assert fused.attrs[NAME]["weights"] == {"sasrec_text": 1.0, "zero_shot": 0.0, "bm25": 0.0}
    history = set(sasrec_mod.history_queries(data.test)["query_id"])
    assert history
    cols = ["query_id", "rank", "item_id"]
    a = own[own["query_id"].isin(history)][cols].reset_index(drop=True)
    b = fused[fused["query_id"].isin(history)][cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)

"""Issue 23 items 1-3: rows read to the budgets users run (eval.budgets), the fusion chosen for a budget
(retriever.fusion.objective) and the ablation without the generated list (retriever.fusion.use_generated)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import tiny_params, write_catalog

from components.evaluation.recall_curve import recall_at_k_figure
from components.ranking.metrics import evaluate_ranked
from components.retrieval.fusion import FusionCandidates, Ranked, choose_fusion, recall_of_top
from components.retrieval.retrieve import retrieve, retrieve_at_least
from components.retrieval.retriever_train import run_train_retriever


def _ranked(lists: list[list[int]]) -> Ranked:
    return Ranked(np.array([i for lst in lists for i in lst], dtype=np.int64),
                  np.zeros(sum(map(len, lists)), np.float32), np.array([len(lst) for lst in lists]))


def test_the_objective_picks_the_weights_best_at_its_budget_not_at_r10():
    """Query 0's target 9 leads only the dense list, query 1's target 4 only the generated one. At R@1 no
    weight serves both (one list must dominate), so the tie keeps the generated list alone; at R@3 an even
    mix puts both targets in both top 3s. A mix objective scores each point by its budgets' recalls."""
    gen, dense = _ranked([[1, 2, 3], [4, 5, 6]]), _ranked([[9, 1, 2], [5, 6, 7]])
    targets = np.array([[9], [4]])
    weights, _, grid = choose_fusion(gen, {"zero_shot": dense}, targets, {1: 1.0}, 60, 10)
    assert weights == [1.0, 0.0] and max(t["recall@1"] for t in grid) == 0.5
    weights, _, grid = choose_fusion(gen, {"zero_shot": dense}, targets, {3: 1.0}, 60, 10)
    assert 0.0 < weights[0] < 1.0 and max(t["recall@3"] for t in grid) == 1.0
    assert [t["recall@3"] for t in grid if t["weights"]["generated"] in (0.0, 1.0)] == [0.5, 0.5]   # one list: one query
    _, _, grid = choose_fusion(gen, {"zero_shot": dense}, targets, {1: 0.5, 3: 0.5}, 60, 10)
    for point in grid:
        assert point["objective"] == pytest.approx(0.5 * point["recall@1"] + 0.5 * point["recall@3"])


def test_without_generation_the_generated_list_takes_no_part():
    """use_generated false: every point keeps the generated weight at 0, and an item only the generated list
    holds never enters the fused list (not even as a zero-score tail)."""
    gen, dense = _ranked([[7, 1], [7]]), _ranked([[1, 2], [3]])
    targets = np.array([[7], [7]])
    weights, _, grid = choose_fusion(gen, {"zero_shot": dense}, targets, {2: 1.0}, 60, 10, with_generated=False)
    assert weights[0] == 0.0 and {t["weights"]["generated"] for t in grid} == {0.0}
    assert all(t["recall@2"] == 0.0 for t in grid)   # target 7 is only generated
    with_gen = choose_fusion(gen, {"zero_shot": dense}, targets, {2: 1.0}, 60, 10)
    assert max(t["recall@2"] for t in with_gen[2]) == 1.0
    fused = FusionCandidates([dense], 10).top([1.0], 60, 2)
    assert 7 not in fused and recall_of_top(fused, targets) == 0.0


def test_reach_marks_the_queries_a_row_could_not_fill():
    items = pd.DataFrame({"item_id": [f"it{i}" for i in range(6)], "popularity": [5, 4, 3, 2, 1, 0],
                          "group": ["head", "head", "tail", "tail", "tail", "cold"]})
    queries = pd.DataFrame({"query_id": ["a", "b"], "targets": [["it0"], ["it5"]], "history": [[], []],
                            "text": ["x", "y"]})
    ranked = pd.DataFrame({"query_id": ["a", "a", "a", "b"], "rank": [0, 1, 2, 0],
                           "item_id": ["it1", "it0", "it2", "it5"], "score": [3.0, 2.0, 1.0, 1.0], "sid": ""})
    out = evaluate_ranked(ranked, queries, items, [1, 3], n_boot=0, budgets=[1, 3])["overall"]["metrics"]
    assert out["reach@1"]["mean"] == 1.0 and out["reach@3"]["mean"] == 0.5     # b returned one item
    assert out["recall@3"]["mean"] == 1.0                                       # R@3 over what each returned


@pytest.mark.slow
def test_a_generative_row_reaches_the_budget_a_small_beam_leaves_short(tmp_path):
    """The paper's retriever (no fusion) decoded with a beam of 2 SIDs holds few items; retrieve_at_least
    decodes the short queries once more with a beam of k SIDs and every query then holds >= k items, with
    the queries the first beam filled left as they were."""
    write_catalog(tmp_path)
    params = tiny_params(tmp_path, epochs=1, item_head=False, fusion={"sources": "none"})
    run_train_retriever(params)
    queries = pd.read_parquet(tmp_path / "prepared" / "queries.parquet")
    k = 8
    first = retrieve(params, queries, beam=2)
    assert (first.groupby("query_id").size() < k).any()
    deep = retrieve_at_least(params, queries, k, beam=2)
    counts = deep.groupby("query_id").size().reindex(queries["query_id"].astype(str))
    assert (counts >= k).all() and list(dict.fromkeys(deep["query_id"])) == list(queries["query_id"].astype(str))
    filled = set(first.groupby("query_id").size().loc[lambda s: s >= k].index)
    for qid in filled:
        same = deep[deep.query_id == qid].reset_index(drop=True)
        pd.testing.assert_frame_equal(same, first[first.query_id == qid].reset_index(drop=True))
    for _, grp in deep.groupby("query_id"):
        assert grp["rank"].tolist() == list(range(len(grp)))


def test_the_recall_at_k_figure_draws_the_main_rows_under_their_results_names(tmp_path):
    index = pd.MultiIndex.from_product([["SA2CRQ", "bm25", "popular", "TIGER (no collision token)"],
                                        ["overall", "head"]], names=["method", "group"])
    table = pd.DataFrame({"recall@10": 0.1, "recall@100": 0.3, "recall@500": 0.5, "recall@all": 0.6}, index=index)
    rows = recall_at_k_figure(table, tmp_path / "r.png", [10, 100, 500])
    assert rows == ["SA2CRQ", "BM25"]                       # most popular and the ablations stay in the tables
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_balanced_weighs_every_budget_by_its_best_and_each_objective_says_its_cost():
    """Point a is best at R@10, b at R@500, c is near the best at both: balanced (each recall over its best,
    averaged) takes c, where a raw sum would take b (R@500's scale dominates); objective_choices lists each
    objective's point with its recall at every budget."""
    from components.retrieval.fusion import objective_choices

    def point(gen: float, r10: float, r500: float) -> dict:
        return {"weights": {"generated": gen, "zero_shot": 1 - gen}, "rrf_k": 60, "recall@10": r10,
                "recall@500": r500}

    grid = [point(0.6, 0.130, 0.40), point(0.2, 0.090, 0.58), point(0.4, 0.125, 0.53)]
    rows = {r["objective"]: r for r in objective_choices(
        grid, {"r10": {10: 1.0}, "r500": {500: 1.0}, "sum": {10: 1.0, 500: 1.0}, "balanced": "balanced"}, [10, 500])}
    assert rows["r10"]["weights"]["generated"] == 0.6 and rows["r500"]["weights"]["generated"] == 0.2
    assert rows["sum"]["weights"]["generated"] == 0.2 and rows["balanced"]["weights"]["generated"] == 0.4
    assert (rows["balanced"]["recall@10"], rows["balanced"]["recall@500"]) == (0.125, 0.53)


def test_fusion_objectives_reads_the_trained_grid_and_names_a_missing_one(tmp_path, smoke_params, capsys):
    import json

    from components.runtime.config import resolve_params
    from sa2crq.cli import main

    params = resolve_params(smoke_params, [f"out_dir={tmp_path}"])
    args = ["fusion-objectives", "-s", "profile=smoke", "-s", f"out_dir={tmp_path}"]
    assert main(args) == 2 and "retriever_train.json: not found" in capsys.readouterr().err
    budgets = params["eval"]["budgets"]
    grid = [{"weights": {"generated": g, "bm25": 1 - g}, "rrf_k": 60,
             **{f"recall@{k}": (0.1 + g / 10 if k == budgets[0] else 0.5 - g / 10) for k in budgets}}
            for g in (0.0, 0.5, 1.0)]
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "retriever_train.json").write_text(json.dumps({"fusion_grid": grid}))
    assert main(args) == 0
    table = capsys.readouterr().out.splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert "generated 1.0" in rows[f"recall@{budgets[0]}"] and "generated 0.0" in rows[f"recall@{budgets[-1]}"]
    without = [line for name, line in rows.items() if name.endswith("without generation")]
    assert len(without) == 1 and "generated 0.0" in without[0]

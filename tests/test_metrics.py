"""Metrics on hand-computed examples: recall / MRR / NDCG, groups, several targets, SID groups, CIs."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from components.ranking.metrics import (
    bootstrap_ci,
    chance_by_length,
    chance_hallucination,
    drop_history_items,
    evaluate_ranked,
    hallucination_per_query,
    hallucination_table,
    issued_by_length,
    per_query_metrics,
    recall_by_popularity_decile,
    sid_space,
    target_pairs,
    target_ranks,
)
from components.runtime.errors import DataError
from components.tokenizers.sid_vocab import END, SidVocab


def ranked_from_lists(lists: dict[str, list[str]], sids: dict[str, str] | None = None) -> pd.DataFrame:
    rows = [(q, r, item, -float(r), (sids or {}).get(item, "")) for q, items in lists.items()
            for r, item in enumerate(items)]
    return pd.DataFrame(rows, columns=["query_id", "rank", "item_id", "score", "sid"])


@pytest.fixture
def catalog() -> pd.DataFrame:
    return pd.DataFrame({
        "item_id": ["A", "B", "C", "D", "X", "Y"],
        "text": list("abcdxy"),
        "popularity": [50, 40, 2, 0, 1, 1],
        "group": ["head", "head", "tail", "cold", "tail", "tail"],
    })


@pytest.fixture
def queries() -> pd.DataFrame:
    return pd.DataFrame({"query_id": ["q1", "q2", "q3"], "targets": [["A"], ["B", "C"], ["D"]]})


@pytest.fixture
def ranked() -> pd.DataFrame:
    return ranked_from_lists({"q1": ["X", "A", "Y"], "q2": ["B", "X", "Y", "C"], "q3": ["X", "Y"]})


def test_per_query_values_match_hand_computation(ranked, queries, catalog):
    table = per_query_metrics(target_ranks(ranked, target_pairs(queries, catalog)), ks=[1, 5])
    q1, q2, q3 = table.loc["q1"], table.loc["q2"], table.loc["q3"]
    assert q1["recall@1"] == 0 and q1["recall@5"] == 1
    assert q1["mrr@5"] == pytest.approx(0.5)
    assert q1["ndcg@5"] == pytest.approx(1 / math.log2(3))
    # two targets at ranks 0 and 3
    assert q2["recall@1"] == pytest.approx(0.5) and q2["recall@5"] == 1
    assert q2["mrr@5"] == 1
    assert q2["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))
    assert q2["ndcg@1"] == pytest.approx(1.0)  # ideal DCG@1 holds one hit only
    assert (q3 == 0).all()


def test_groups_count_a_query_in_each_target_group(ranked, queries, catalog):
    res = evaluate_ranked(ranked, queries, catalog, ks=[1, 5], n_boot=20, seed=0)
    assert res["overall"]["n_queries"] == 3
    assert res["overall"]["metrics"]["recall@1"]["mean"] == pytest.approx((0 + 0.5 + 0) / 3)
    # head: q1 (A at rank 1) and q2 with only B relevant (rank 0)
    assert res["head"]["n_queries"] == 2
    assert res["head"]["metrics"]["recall@1"]["mean"] == pytest.approx(0.5)
    assert res["head"]["metrics"]["mrr@5"]["mean"] == pytest.approx((0.5 + 1) / 2)
    # tail: q2 with only C relevant (rank 3)
    assert res["tail"]["n_queries"] == 1
    assert res["tail"]["metrics"]["mrr@5"]["mean"] == pytest.approx(0.25)
    assert res["tail"]["metrics"]["ndcg@5"]["mean"] == pytest.approx(1 / math.log2(5))
    assert res["cold"]["metrics"]["recall@5"]["mean"] == 0
    assert res["overall"]["metrics"]["ret_per"]["mean"] == pytest.approx((3 + 4 + 2) / 3)
    assert res["tail"]["metrics"]["ret_per"]["mean"] == 4


def test_sid_group_fills_m_item_ranks(catalog):
    # SID "1" holds X, Y (ranks 0, 1); SID "2-3" holds A, B, C (ranks 2, 3, 4): C sits at item rank 4
    ranked = ranked_from_lists({"q": ["X", "Y", "A", "B", "C"]}, sids={"X": "1", "Y": "1", "A": "2-3", "B": "2-3",
                                                                      "C": "2-3"})
    q = pd.DataFrame({"query_id": ["q"], "targets": [["C"]]})
    res = evaluate_ranked(ranked, q, catalog, ks=[3, 5], n_boot=10, seed=0)["overall"]["metrics"]
    assert res["recall@3"]["mean"] == 0
    assert res["recall@5"]["mean"] == 1
    assert res["mrr@5"]["mean"] == pytest.approx(1 / 5)
    assert res["ret_per"]["mean"] == 5


def test_deep_ks_and_recall_all(catalog):
    ranked = ranked_from_lists({"q": ["X", "Y", "B", "A"]})
    q = pd.DataFrame({"query_id": ["q"], "targets": [["A", "D"]]})
    table = per_query_metrics(target_ranks(ranked, target_pairs(q, catalog)), ks=[1], deep_ks=[4])
    assert table.loc["q", "recall@4"] == pytest.approx(0.5)
    assert table.loc["q", "recall@all"] == pytest.approx(0.5)
    assert "mrr@4" not in table.columns


def test_bad_inputs_name_the_problem(ranked, catalog):
    q = pd.DataFrame({"query_id": ["q1"], "targets": [["ZZZ"]]})
    with pytest.raises(DataError, match="targets"):
        evaluate_ranked(ranked, q, catalog, ks=[1], n_boot=0)
    dup = pd.concat([ranked, ranked.iloc[:1]], ignore_index=True)
    with pytest.raises(DataError, match="rank"):
        evaluate_ranked(dup, pd.DataFrame({"query_id": ["q1"], "targets": [["A"]]}), catalog, ks=[1], n_boot=0)


def test_drop_history_items_closes_rank_gaps():
    ranked = ranked_from_lists({"q1": ["A", "B", "C", "D"], "q2": ["A", "B", "C"]})
    queries = pd.DataFrame({"query_id": ["q1", "q2"], "history": [["A", "C"], []]})
    out = drop_history_items(ranked, queries, depth=2)
    assert out[out["query_id"] == "q1"].sort_values("rank")["item_id"].tolist() == ["B", "D"]
    assert out[out["query_id"] == "q1"]["rank"].tolist() == [0, 1]
    assert out[out["query_id"] == "q2"].sort_values("rank")["item_id"].tolist() == ["A", "B"]


def test_hallucination_rate(catalog):
    gen = pd.DataFrame({"query_id": ["q1", "q1", "q1", "q2"], "sid": ["1-2", "9-9", "3", "7"],
                        "sid_index": [0, -1, 4, -1]})
    rate = hallucination_per_query(gen)
    assert rate["q1"] == pytest.approx(1 / 3)
    assert rate["q2"] == 1.0


def _generated(rows: list[tuple[str, int, str, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["query_id", "beam_rank", "sid", "sid_index"]).assign(score=0.0)


def test_hallucination_all_beams_top_k_and_over_chance():
    # codebooks 2 x 3; issued: both length-1 SIDs and 3 of the 6 length-2 ones
    sizes, issued = [2, 3], issued_by_length([[0], [1], [1], [0, 0], [0, 1], [1, 1]])
    assert issued == {1: 2, 2: 3}                                   # an SID shared by two items counts once
    assert chance_by_length(sizes, issued) == pytest.approx([0.0, 0.5])
    gen = _generated([                                               # rows out of beam order on purpose
        ("q1", 3, "0-0", 3), ("q1", 0, "1-2", -1), ("q1", 4, "1", 1), ("q1", 1, "0", 0), ("q1", 2, "1-0", -1),
        ("q2", 1, "1", 1), ("q2", 0, "0", 0),
        ("q3", 5, "0-2", -1), ("q3", 0, "0-0", 3), ("q3", 1, "1-1", 5),   # beam ranks 2-4 decoded nothing
    ])
    table = hallucination_table(gen, 2, sizes, issued)
    assert list(table.columns) == ["hallucination", "hallucination@2", "hallucination_norm"]
    q1, q2, q3 = table.loc["q1"], table.loc["q2"], table.loc["q3"]
    assert q1["hallucination"] == pytest.approx(2 / 5)
    assert q1["hallucination@2"] == pytest.approx(1 / 2)             # beams 0 ("1-2", miss) and 1 ("0", hit)
    assert q1["hallucination_norm"] == pytest.approx(2 / 1.5)         # 3 length-2 beams x 0.5: worse than random
    assert (q2["hallucination"], q2["hallucination@2"]) == (0.0, 0.0)
    assert q2["hallucination_norm"] == 1.0                           # length 1 is fully issued: chance did as well
    assert q3["hallucination"] == pytest.approx(1 / 3) and q3["hallucination@2"] == 0.0
    assert q3["hallucination_norm"] == pytest.approx(1 / 1.5)
    assert hallucination_per_query(gen, 2).name == "hallucination@2"
    with pytest.raises(ValueError, match="3 codes"):
        hallucination_table(_generated([("q", 0, "0-0-0", -1)]), 2, sizes, issued)


def test_hallucination_frame_is_reported_per_group(catalog):
    ranked = ranked_from_lists({"q1": ["A"], "q2": ["C"]})
    q = pd.DataFrame({"query_id": ["q1", "q2"], "targets": [["A"], ["C"]]})
    rates = pd.DataFrame({"hallucination": [0.2, 0.6], "hallucination@10": [0.0, 0.5],
                          "hallucination_norm": [0.4, 1.2]}, index=pd.Index(["q1", "q2"], name="query_id"))
    res = evaluate_ranked(ranked, q, catalog, ks=[1], n_boot=10, seed=0, hallucination=rates)
    overall = res["overall"]["metrics"]
    assert overall["hallucination"]["mean"] == pytest.approx(0.4)
    assert overall["hallucination@10"]["mean"] == pytest.approx(0.25)
    assert overall["hallucination_norm"]["mean"] == pytest.approx(0.8)
    assert res["tail"]["metrics"]["hallucination_norm"]["mean"] == pytest.approx(1.2)   # q2's target C is tail
    series = evaluate_ranked(ranked, q, catalog, ks=[1], n_boot=0, hallucination=pd.Series([0.5, 0.5], ["q1", "q2"]))
    assert series["overall"]["metrics"]["hallucination"]["mean"] == 0.5


def _emittable(vocab: SidVocab) -> list[tuple[int, ...]]:
    """Brute force: every code sequence the unconstrained decoder's per-depth mask lets it end."""
    mask, out = vocab.layer_mask(), []

    def walk(prefix: tuple[int, ...]) -> None:
        depth = len(prefix)
        if depth == vocab.max_len:                     # nothing can follow a full-length SID
            out.append(prefix)
            return
        if mask[depth, END]:
            out.append(prefix)
        for code in range(vocab.codebook_sizes[depth]):
            assert mask[depth, vocab.offsets[depth] + code]
            walk(prefix + (code,))

    walk(())
    return out


@pytest.mark.parametrize("sizes", [[2, 3, 2], [3, 1, 4], [5]])
def test_chance_rate_matches_brute_force_enumeration(sizes):
    every = _emittable(SidVocab(tuple(sizes)))
    assert len(every) == len(set(every)) == sid_space(sizes)
    assert all(len(s) >= 1 for s in every)                                # END is masked at depth 0
    rng = np.random.default_rng(len(every))
    issued_set = {s for s in every if rng.random() < 0.4}
    items = [list(s) for s in issued_set for _ in range(2)]              # two items per SID
    issued = issued_by_length(items)
    miss = [s not in issued_set for s in every]
    assert chance_hallucination(sizes, issued) == pytest.approx(np.mean(miss))
    by_length = chance_by_length(sizes, issued)
    for n in range(1, len(sizes) + 1):
        at_n = [m for s, m in zip(every, miss) if len(s) == n]
        assert by_length[n - 1] == pytest.approx(np.mean(at_n))
        assert chance_hallucination(sizes, issued, [n]) == pytest.approx(np.mean(at_n))
    two = [m for s, m in zip(every, miss) if len(s) in (1, len(sizes))]
    assert chance_hallucination(sizes, issued, sorted({1, len(sizes)})) == pytest.approx(np.mean(two))
    with pytest.raises(ValueError, match="outside"):
        sid_space(sizes, [len(sizes) + 1])


def test_chance_rate_with_collision_layer_and_enumerated_norm():
    # TIGER-like: 2 x 2 semantic codes + a collision layer of 3; every issued SID is full length
    sizes = [2, 2, 3]
    issued = issued_by_length([[0, 0, 0], [0, 0, 1], [1, 1, 0]])
    assert chance_hallucination(sizes, issued) == pytest.approx(1 - 3 / (2 + 4 + 12))
    assert chance_by_length(sizes, issued) == pytest.approx([1.0, 1.0, 1 - 3 / 12])
    # the norm's denominator is what a uniformly random SID of each beam's length would score
    every = [s for s in itertools.product(range(2), range(2), range(3))]
    random_rate = np.mean([s not in {(0, 0, 0), (0, 0, 1), (1, 1, 0)} for s in every])
    gen = _generated([("q", 0, "0-0-0", 0), ("q", 1, "1-0-2", -1), ("q", 2, "1-1", -1)])
    norm = hallucination_table(gen, 10, sizes, issued).loc["q", "hallucination_norm"]
    assert norm == pytest.approx(2 / (random_rate * 2 + 1.0))


def test_bootstrap_contains_mean_and_shrinks():
    rng = np.random.default_rng(1)
    small = (rng.random((40, 1)) < 0.3).astype(float)
    large = (rng.random((4000, 1)) < 0.3).astype(float)
    lo_s, hi_s = bootstrap_ci(small, 300, seed=0)
    lo_l, hi_l = bootstrap_ci(large, 300, seed=0)
    assert lo_s[0] <= small.mean() <= hi_s[0]
    assert lo_l[0] <= large.mean() <= hi_l[0]
    assert (hi_l - lo_l)[0] < (hi_s - lo_s)[0] / 4
    again = bootstrap_ci(small, 300, seed=0)
    assert np.array_equal(again[0], lo_s) and np.array_equal(again[1], hi_s)


def test_recall_by_decile_puts_targets_in_their_decile():
    items = pd.DataFrame({"item_id": [f"i{j}" for j in range(20)], "popularity": range(20),
                          "group": ["tail"] * 20, "text": ["t"] * 20})
    q = pd.DataFrame({"query_id": ["a", "b", "c"], "targets": [["i19"], ["i18"], ["i0"]]})
    ranked = ranked_from_lists({"a": ["i19"], "b": ["i5"], "c": ["i0"]})
    dec = recall_by_popularity_decile(ranked, q, items, k=1).set_index("decile")
    assert dec.loc[10, "recall"] == pytest.approx(0.5) and dec.loc[10, "n_pairs"] == 2
    assert dec.loc[1, "recall"] == 1.0
    assert dec.loc[5, "n_pairs"] == 0

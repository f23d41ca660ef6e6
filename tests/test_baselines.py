"""Baselines on tiny synthetic catalogs: BM25, zero-shot dense, most-popular, two-tower."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import history_queries

from components.baselines.classic import bm25, dense_zero_shot, most_popular, query_vectors
from components.ranking.bm25 import bm25_query_texts
from components.ranking.metrics import check_ranked
from components.runtime.errors import DataError

WORDS = ["microscope", "pipette", "beaker", "centrifuge", "thermometer", "glove", "goggles", "flask", "burette",
         "magnet", "scale", "tweezers"]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def items() -> pd.DataFrame:
    texts = [f"{WORDS[i]} {WORDS[(i + 3) % len(WORDS)]} lab supply" for i in range(len(WORDS))]
    return pd.DataFrame({"item_id": [f"it{i}" for i in range(len(WORDS))], "text": texts,
                         "popularity": [5, 9, 1, 0, 9, 2, 3, 3, 0, 1, 7, 4], "group": ["tail"] * len(WORDS)})


@pytest.fixture
def item_emb(items) -> np.ndarray:
    return unit(np.random.default_rng(0).normal(size=(len(items), 16)))


def text_queries(texts: list[str]) -> pd.DataFrame:
    n = len(texts)
    return pd.DataFrame({"query_id": [f"q{i}" for i in range(n)], "split": "test", "order": range(n),
                         "history": [[] for _ in range(n)], "text": texts, "targets": [["it0"]] * n,
                         "emb_row": range(n)})


def test_bm25_finds_the_exact_text_item(items):
    q = text_queries([items.loc[7, "text"], "goggles magnet"])
    res = bm25(q, items, k=5)
    check_ranked(res)
    firsts = res[res["rank"] == 0].set_index("query_id")["item_id"]
    assert firsts["q0"] == "it7"
    assert firsts["q1"] == "it6"  # the only item holding both words
    assert res.groupby("query_id").size().eq(5).all()
    assert (res["sid"] == "").all()


def test_bm25_history_query_uses_last_items(items):
    q = history_queries([["it1", "it2", "it5"]])
    assert bm25_query_texts(q, items, last_n=2) == [f"{items.loc[2, 'text']} {items.loc[5, 'text']}"]
    res = bm25(q, items, k=3, last_n=1)
    assert res.sort_values("rank")["item_id"].iloc[0] == "it5"


def test_dense_ranks_the_identical_embedding_first(items, item_emb):
    q = text_queries(["x", "y"])
    q_emb = item_emb[[4, 9]]
    res = dense_zero_shot(q, items, item_emb, q_emb, k=4)
    check_ranked(res)
    firsts = res[res["rank"] == 0].set_index("query_id")["item_id"]
    assert firsts["q0"] == "it4" and firsts["q1"] == "it9"
    assert res[res["query_id"] == "q0"]["score"].is_monotonic_decreasing
    assert res.loc[res["rank"] == 0, "score"].to_numpy() == pytest.approx(1.0, abs=1e-5)


def test_history_vector_is_mean_of_last_items(items, item_emb):
    q = history_queries([["it0", "it1", "it2", "it3"]])
    vec = query_vectors(q, items, item_emb, None, last_n=2)[0]
    expected = item_emb[2] + item_emb[3]
    assert vec == pytest.approx(expected / np.linalg.norm(expected), abs=1e-6)


def test_unknown_history_item_and_empty_query_fail(items, item_emb):
    with pytest.raises(DataError, match="history"):
        dense_zero_shot(history_queries([["it0", "nope"]]), items, item_emb, None, k=3)
    with pytest.raises(DataError, match="neither text nor history"):
        query_vectors(history_queries([[]]), items, item_emb, None)


def test_most_popular_order_breaks_ties_by_id(items):
    res = most_popular(text_queries(["a", "b"]), items, k=3)
    assert res[res["query_id"] == "q1"]["item_id"].tolist() == ["it1", "it4", "it10"]
    assert len(res) == 6


def test_two_tower_learns_next_item_and_is_deterministic(items, item_emb):
    from components.baselines.two_tower import two_tower

    rng = np.random.default_rng(0)
    n = len(items)
    hist = [[f"it{j}" for j in rng.integers(0, n, size=2)] + [f"it{i % n}"] for i in range(600)]
    train = history_queries(hist)
    train["targets"] = [[f"it{(i + 1) % n}"] for i in range(600)]
    test = history_queries([[f"it{i}"] for i in range(n)])
    test["targets"] = [[f"it{(i + 1) % n}"] for i in range(n)]
    cfg = {"dim": 16, "max_len": 4, "n_memory": 2, "dropout": 0.0, "lr": 0.03, "temperature": 0.1,
           "batch_size": 120, "epochs": 10, "patience": 0}
    res = two_tower(train, test, items, item_emb, None, cfg, seed=3, k=3)
    check_ranked(res)
    top1 = res[res["rank"] == 0].set_index("query_id")["item_id"]
    hits = sum(top1[f"h{i}"] == f"it{(i + 1) % n}" for i in range(n))
    assert hits >= n // 2
    again = two_tower(train, test, items, item_emb, None, cfg, seed=3, k=3)
    pd.testing.assert_frame_equal(res, again)


def test_top_k_matches_a_stable_sort_with_ties():
    from components.ranking.ranked import top_k

    rng = np.random.default_rng(0)
    for _ in range(50):
        scores = rng.integers(0, 3, size=(4, 11)).astype(np.float32)
        k = int(rng.integers(1, 12))
        idx, vals = top_k(scores, k)
        expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        assert np.array_equal(idx, expected)
        assert np.array_equal(vals, np.take_along_axis(scores, expected, axis=1))


def test_two_tower_keeps_the_best_validation_epoch(items, item_emb):
    from components.baselines.two_tower import train_two_tower

    n = len(items)
    train = history_queries([[f"it{i % n}"] for i in range(300)])
    train["targets"] = [[f"it{(i + 1) % n}"] for i in range(300)]
    valid = history_queries([[f"it{i}"] for i in range(n)])
    valid["targets"] = [[f"it{(i + 1) % n}"] for i in range(n)]
    cfg = {"dim": 16, "max_len": 4, "n_memory": 2, "dropout": 0.0, "lr": 0.03, "temperature": 0.1,
           "batch_size": 60, "epochs": 6, "patience": 0}
    model = train_two_tower(train, items, item_emb, None, cfg, seed=1, valid=valid)
    fit = model.fit_result
    assert fit.epochs_run == 6 and fit.best_score is not None
    # the kept weights score the best epoch's validation recall again
    q_idx, is_text, targets = model.val_queries
    top = model.scores(q_idx, is_text).topk(10, dim=1).indices.numpy()
    assert np.mean([np.isin(t, row).mean() for t, row in zip(targets, top)]) == pytest.approx(fit.best_score)

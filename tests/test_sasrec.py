"""SASRec rows (cornac 3.0.1): data hand-off, checkpoint choice, same queries as the other rows, text-only skip."""
from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from components.baselines import sasrec as sasrec_mod
from components.evaluation import evaluate as evaluate_mod
from components.ranking.metrics import GROUPS
from components.runtime.atomic import write_npy, write_parquet
from components.runtime.config import deep_merge
from components.runtime.errors import ConfigError
from flows import compare as compare_mod


def _amazon_like(seqs: dict[str, list[str]], max_hist: int) -> pd.DataFrame:
    """Queries as the amazon adapter writes them (leave-last-out, history capped at max_hist)."""
    rows = []
    for user, seq in seqs.items():
        n = len(seq)
        for pos in range(1, n):
            split = "test" if pos == n - 1 else "valid" if pos == n - 2 else "train"
            rows.append({"query_id": f"u{user}-{pos}", "split": split, "order": pos,
                         "history": seq[max(0, pos - max_hist):pos], "text": None, "targets": [seq[pos]]})
    return pd.DataFrame(rows)


def test_train_sessions_are_the_users_training_sequences():
    seqs = {"a": list("abcdefgh"), "b": list("xbcdefgy"), "c": list("ab" "z"), "d": list("abcq")}
    q = _amazon_like(seqs, max_hist=3)
    rows = {i: n for n, i in enumerate(sorted({i for s in seqs.values() for i in s}))}
    sessions = sasrec_mod.train_sessions(q[q["split"] == "train"], rows, max_history=3)
    back = sorted("".join(sorted(rows, key=rows.get)[i] for i in s) for s in sessions)
    # a and d share the prefix "ab": any pairing gives the same (last-3 history, target) pairs
    assert sorted(back) == sorted(["abcdef", "xbcdef", "ab"])
    pairs = {(tuple(s[max(0, t - 3):t]), s[t]) for s in sessions for t in range(1, len(s))}
    train = q[q["split"] == "train"]
    assert pairs == {(tuple(rows[i] for i in h), rows[t[0]]) for h, t in zip(train["history"], train["targets"])}


def test_validator_keeps_the_best_epoch_and_stops_on_patience():
    state = {"w": torch.zeros(1)}
    net = SimpleNamespace(state_dict=lambda: state)
    scores = iter([0.1, 0.3, 0.2, 0.25, 0.9])

    def score_fn(_net):
        state["w"] += 1  # the weights move every epoch
        return {"recall": 0.0, "ndcg": next(scores)}

    v = sasrec_mod.Validator(score_fn, "ndcg", eval_every=2, patience=2)
    assert v(SimpleNamespace(model=net)) == 0.1 and v(SimpleNamespace(model=net)) == 0.3
    v(SimpleNamespace(model=net))
    with pytest.raises(sasrec_mod.StopTraining):
        v(SimpleNamespace(model=net))
    assert v.best_epoch == 4 and v.best == 0.3 and float(v.best_state["w"]) == 2.0
    assert [c["epoch"] for c in v.curve] == [2, 4, 6, 8]


def test_bad_sasrec_setting_names_the_key(smoke_params):
    bad = deep_merge(smoke_params, {"eval": {"sasrec": {"dropout": [0.2, 1.5]}}})
    with pytest.raises(ConfigError, match="eval.sasrec.dropout"):
        sasrec_mod.sasrec_config(bad)
    with pytest.raises(ConfigError, match="eval.sasrec.heads"):
        sasrec_mod.sasrec_config(deep_merge(smoke_params, {"eval": {"sasrec": {"dim": 30, "heads": 4}}}))
    assert sasrec_mod.sasrec_config(deep_merge(smoke_params, {"eval": {"sasrec": {"dropout": 0.3}}}))["dropout"] == [0.3]


@pytest.fixture(scope="module")
def smoke_data(smoke_embedded):
    return smoke_embedded, evaluate_mod.load_eval_inputs(smoke_embedded)


@pytest.mark.slow
def test_rows_rank_the_same_test_queries_and_groups_as_bm25(smoke_data):
    params, data = smoke_data
    results, _ = evaluate_mod.evaluate_all(params, data, ["bm25", "sasrec", "sasrec_text"], generative=False)
    assert list(results) == ["bm25", "SASRec", "SASRec + text"]
    for label in ("SASRec", "SASRec + text"):
        for group in ("overall",) + GROUPS:
            assert results[label][group]["n_queries"] == results["bm25"][group]["n_queries"]
            assert "recall@10" in results[label][group]["metrics"]
    frame = evaluate_mod.run_baseline("sasrec_text", params, data)
    bm25 = evaluate_mod.run_baseline("bm25", params, data)
    assert set(frame["query_id"]) == set(bm25["query_id"]) == set(data.test["query_id"])
    assert frame.groupby("query_id").size().eq(evaluate_mod.fetch_depth(params)).all()
    info = frame.attrs["sasrec"]
    assert info["row"] == "SASRec + text" and info["epoch"] >= 1 and 0 <= info["val"]["recall"] <= 1
    # the recorded validation figure is the best of the curve (first best on ties)
    curve = info["curves"][info["dropout"]]
    metric = params["eval"]["sasrec"]["val_metric"]
    assert info["val"][metric] == max(c[metric] for c in curve)


@pytest.mark.slow
def test_same_seed_same_ranking(smoke_data):
    params, data = smoke_data
    a = evaluate_mod.run_baseline("sasrec", params, data)
    sasrec_mod.FIT_CACHE.clear()   # a second fit, not the process's kept one
    b = evaluate_mod.run_baseline("sasrec", params, data)
    pd.testing.assert_frame_equal(a, b)
    other = evaluate_mod.run_baseline("sasrec", deep_merge(params, {"seed": 1}), data)
    assert not np.allclose(a["score"].to_numpy(), other["score"].to_numpy())


@pytest.mark.slow
def test_validation_restores_the_best_epoch_not_the_last(smoke_data):
    """Through cornac's real loop: scores 0.5, 0.9, 0.1 must leave epoch 2's weights in the model."""
    params, data = smoke_data
    cfg = {**sasrec_mod.sasrec_config(params), "epochs": 3, "eval_every": 1, "patience": 0, "dropout": [0.2]}
    rows = {item_id: row for row, item_id in enumerate(data.items["item_id"])}
    sessions = sasrec_mod.train_sessions(data.train, rows, int(params["data"]["max_history"]))
    states, fake = [], iter([0.5, 0.9, 0.1])

    def val_fn(net):
        states.append(copy.deepcopy(net.state_dict()))
        return {"recall": 0.0, "ndcg": next(fake)}

    run = sasrec_mod.fit_sasrec(sasrec_mod.cornac_train_set(sessions, len(rows), 0), val_fn, cfg, 0, None, "ndcg")
    assert run.epoch == 2 and run.val["ndcg"] == 0.9 and len(states) == 3
    got = run.net.state_dict()
    assert all(torch.equal(got[k], states[1][k]) for k in got)
    assert not all(torch.equal(got[k], states[2][k]) for k in got)


def _write_text_only(out) -> None:
    """A climate-fever-shaped run: text queries, no histories."""
    items = pd.DataFrame({"item_id": [f"a{j}" for j in range(6)], "text": [f"article {j}" for j in range(6)],
                          "popularity": [3, 2, 2, 1, 0, 0], "group": ["head", "head", "tail", "tail", "cold", "cold"]})
    rows = [(f"c{q}", ["train", "valid", "test"][q % 3], q, [], f"claim {q}", [f"a{q % 6}"], q) for q in range(12)]
    queries = pd.DataFrame(rows, columns=["query_id", "split", "order", "history", "text", "targets", "emb_row"])
    rng = np.random.default_rng(0)
    write_parquet(items, out / "prepared" / "items.parquet")
    write_parquet(queries, out / "prepared" / "queries.parquet")
    write_npy(rng.normal(size=(6, 8)).astype(np.float32), out / "embeddings" / "items.npy")
    write_npy(rng.normal(size=(12, 8)).astype(np.float32), out / "embeddings" / "queries.npy")


def test_text_only_dataset_skips_the_rows_with_a_note(smoke_params, tmp_path, caplog):
    _write_text_only(tmp_path)
    params = deep_merge(smoke_params, {"out_dir": str(tmp_path), "dataset": "climate-fever",
                                       "eval": {"baselines": ["popular", "sasrec", "sasrec_text"]}})
    data = evaluate_mod.load_eval_inputs(params)
    with caplog.at_level(logging.WARNING, logger="sa2crq.sasrec"):
        assert evaluate_mod.run_baseline("sasrec", params, data) is None
    assert "SASRec row skipped: no training sequences" in caplog.text and "climate-fever" in caplog.text
    results, _ = evaluate_mod.evaluate_all(params, data, params["eval"]["baselines"], generative=False)
    assert list(results) == ["popular"]
    for seed in (0, 1):
        for name in params["eval"]["baselines"]:
            compare_mod.run_baseline(params, name, seed)
    long, _, skipped = compare_mod.collect_runs(params, [], [0, 1])
    assert set(long["method"]) == {"popular"} and set(long["seed"]) == {0, 1}
    note = "skipped: no histories, SASRec needs sequences"     # the comparison keeps the rows, saying why
    assert skipped == {"SASRec": note, "SASRec + text": note}

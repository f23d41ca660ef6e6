"""A/B candidates: per-query top-K from two versions, and their comparison statistics."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.runtime.errors import DataError
from flows.candidates_flow import CANDIDATE_COLUMNS, read_queries

K = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory, trained, prefect_server) -> dict:
    base = Path(trained["params"]["out_dir"])
    root = tmp_path_factory.mktemp("ab")
    test = pd.read_parquet(base / "prepared" / "queries.parquet").query("split == 'test'").head(25)
    queries = root / "queries.jsonl"
    test[["query_id", "history"]].to_json(queries, orient="records", lines=True)
    return {"params": trained["params"], "base": base, "root": root, "queries": queries, "n": len(test)}


def _check_candidates(out: Path, n_queries: int) -> pd.DataFrame:
    cands = pd.read_parquet(out / "candidates.parquet")
    assert tuple(cands.columns) == CANDIDATE_COLUMNS
    assert cands["rank"].dtype == np.int64 and cands["score"].dtype == np.float64
    assert all(pd.api.types.is_string_dtype(cands[c]) for c in ("query_id", "variant", "item_id", "sid"))
    sizes = cands.groupby(["query_id", "variant"]).size()
    assert len(sizes) == 2 * n_queries and (sizes == K).all()
    assert (cands.groupby(["query_id", "variant"])["rank"].agg(sorted).map(list) == [list(range(K))] * len(sizes)).all()
    return cands


@pytest.mark.slow
def test_same_version_gives_identical_candidates(setup):
    from flows.candidates_flow import candidates_flow

    out = setup["root"] / "same"
    stats = candidates_flow(params=setup["params"], opt_a=str(setup["base"]), opt_b=str(setup["base"]),
                            opt_queries=str(setup["queries"]), opt_k=K, opt_out=str(out))
    cands = _check_candidates(out, setup["n"])
    a = cands[cands["variant"] == "A"].drop(columns="variant").reset_index(drop=True)
    b = cands[cands["variant"] == "B"].drop(columns="variant").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert stats[f"jaccard@{K}"] == 1.0 and json.loads((out / "stats.json").read_text()) == stats
    for v in stats["variants"].values():
        assert 0 < v["coverage"] <= 1 and v["head_share"] + v["tail_share"] + v["cold_share"] == pytest.approx(1.0)


@pytest.mark.slow
def test_sid_table_only_version_changes_candidates(setup):
    """Version B holds only a SID table (SIDs swapped between items); the rest comes from params' out_dir."""
    from flows.candidates_flow import candidates_flow

    b_dir = setup["root"] / "B"
    shutil.copytree(setup["base"] / "sids", b_dir / "sids")
    table = pd.read_parquet(b_dir / "sids" / "sid_table.parquet")
    perm = np.random.default_rng(0).permutation(len(table))
    table["codes"], table["length"] = table["codes"].to_numpy()[perm], table["length"].to_numpy()[perm]
    table.to_parquet(b_dir / "sids" / "sid_table.parquet", index=False)
    out = setup["root"] / "ab"
    stats = candidates_flow(params=setup["params"], opt_a=str(setup["base"]), opt_b=str(b_dir),
                            opt_queries=str(setup["queries"]), opt_k=K, opt_out=str(out))
    _check_candidates(out, setup["n"])
    assert 0.0 <= stats[f"jaccard@{K}"] < 1.0
    assert stats["variants"]["B"]["path"] == str(b_dir)


def test_queries_need_text_or_history(tmp_path):
    bad = tmp_path / "q.csv"
    pd.DataFrame({"query_id": ["a", "b"], "history": ["i1 i2", ""]}).to_csv(bad, index=False)
    with pytest.raises(DataError, match="neither text nor history") as err:
        read_queries(bad)
    assert err.value.rows == [1]


@pytest.mark.parametrize("frame, column, message, rows", [
    (pd.DataFrame({"query_id": [1.0, 7.5], "text": ["a lamp", "a desk"]}), "query_id", "not the float 7.5", [1]),
    (pd.DataFrame({"query_id": ["a", ""], "text": ["a lamp", "a desk"]}), "query_id", "null or empty id", [1]),
    (pd.DataFrame({"query_id": ["a", "b"], "text": ["a lamp", ["a", "desk"]]}), "text", "text must be a string", [1]),
])
def test_candidate_queries_follow_the_data_contract(tmp_path, frame, column, message, rows):
    """The A/B queries file obeys the same id and text rules as the pipeline's (JSON lines keep the types)."""
    bad = tmp_path / "q.jsonl"
    frame.to_json(bad, orient="records", lines=True)
    with pytest.raises(DataError, match=message) as err:
        read_queries(bad)
    assert err.value.column == column and err.value.rows == rows


def test_integer_query_ids_read_as_their_digits(tmp_path):
    good = tmp_path / "q.csv"
    good.write_text("query_id,text\n7,a lamp\n8,\n")
    with pytest.raises(DataError, match="neither text nor history"):
        read_queries(good)
    good.write_text("query_id,text\n7,a lamp\n")
    assert read_queries(good)["query_id"].tolist() == ["7"]

"""Adapters against the published counts (shared/datasets/SOURCES.md), splits, slices, groups."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, data_root

from components.data.adapters import load_amazon_scientific, load_climate_fever, load_dataset, load_generic
from components.data.prepare import label_groups, popularity_stats, run_prepare
from components.runtime.config import load_params
from components.runtime.errors import ConfigError


def _params(*overrides: str) -> dict:
    return load_params(ROOT / "params.yaml", [f"data.root={data_root()}", *overrides])


@pytest.fixture(scope="module")
def amazon():
    return load_amazon_scientific(_params())


@pytest.fixture(scope="module")
def climate():
    return load_climate_fever(_params())


def _with_groups(items: pd.DataFrame, params: dict) -> pd.DataFrame:
    return items.assign(group=label_groups(items["popularity"].to_numpy(), params["data"]["head_share"]))


def test_amazon_counts_match_sources(amazon):
    items, queries = amazon
    stats = popularity_stats(_with_groups(items, _params()), queries, _params())
    assert stats["n_items"] == 4344
    assert stats["n_queries"]["test"] == 8317 == stats["n_queries"]["valid"]
    assert stats["n_interactions"] == 58492
    assert int((items["popularity"] == 0).sum()) == 17
    assert (queries["emb_row"] == -1).all() and queries["text"].isna().all()


def test_amazon_leave_last_out_split(amazon):
    _, queries = amazon
    inter = json.loads((data_root() / "amazon-scientific" / "Scientific.inter.json").read_text())
    by_id = queries.set_index("query_id")
    for user in ("0", "3", "8316"):
        seq = [str(i) for i in inter[user]]
        n = len(seq)
        test, valid = by_id.loc[f"u{user}-{n - 1}"], by_id.loc[f"u{user}-{n - 2}"]
        assert test["split"] == "test" and list(test["targets"]) == [seq[-1]]
        assert list(test["history"]) == seq[:-1][-20:]
        assert valid["split"] == "valid" and list(valid["targets"]) == [seq[-2]]
        assert list(valid["history"]) == seq[:-2][-20:]
        train = queries[queries["query_id"].str.startswith(f"u{user}-") & (queries["split"] == "train")]
        assert [t[0] for t in train["targets"]] == seq[1:-2]
    assert queries["history"].map(len).max() == 20


def test_climate_counts_match_sources(climate):
    items, queries = climate
    assert len(items) == 1344 and len(queries) == 1535
    assert int(queries["targets"].map(len).sum()) == 4681
    assert queries["emb_row"].tolist() == list(range(1535))
    sizes = queries["split"].value_counts()
    assert sizes["test"] == round(1535 * 0.2) and sizes["valid"] == round(1535 * 0.1)
    gw = items.set_index("item_id").loc["Global warming", "popularity"]
    assert 0 < gw <= 444


def test_climate_item_text_uses_training_evidence_only(climate):
    items, queries = climate
    split_of = dict(zip(queries["query_id"], queries["split"]))
    train_sents, other_sents = set(), set()
    for line in (data_root() / "climate-fever" / "climate-fever.jsonl").read_text().splitlines():
        rec = json.loads(line)
        target = train_sents if split_of[f"c{rec['claim_id']}"] == "train" else other_sents
        target.update(e["evidence"].strip() for e in rec["evidences"])
    train_blob = "\n".join(train_sents)
    leaked = [s for s in other_sents - train_sents if s not in train_blob]  # not quoted inside a train one
    corpus = "\n".join(items["text"])
    assert len(leaked) > 1000 and not any(s in corpus for s in leaked)
    assert any(s in corpus for s in sorted(train_sents)[:50])
    cold = items[items["popularity"] == 0]
    assert (cold["text"] == cold["item_id"] + ".").all()


def test_climate_split_depends_on_split_seed_not_model_seed():
    base = load_climate_fever(_params("data.max_users=300"))[1]["split"].tolist()
    assert load_climate_fever(_params("data.max_users=300", "seed=7"))[1]["split"].tolist() == base
    assert load_climate_fever(_params("data.max_users=300", "data.split_seed=1"))[1]["split"].tolist() != base


def test_max_users_keeps_first_users_and_their_items():
    items, queries = load_amazon_scientific(_params("data.max_users=50"))
    users = queries["query_id"].str.split("-").str[0].unique()
    assert list(users) == [f"u{i}" for i in range(50)]
    touched = {i for col in ("history", "targets") for ids in queries[col] for i in ids}
    assert set(items["item_id"]) == touched


def test_label_groups_head_is_smallest_prefix_holding_share():
    pop = np.array([1, 10, 0, 5, 3, 1, 0])
    groups = label_groups(pop, 0.5)
    assert groups.tolist() == ["tail", "head", "cold", "tail", "tail", "tail", "cold"]
    groups = label_groups(pop, 0.7)  # 10 + 5 = 15 of 20 >= 14
    assert sorted(np.flatnonzero(groups == "head").tolist()) == [1, 3]
    assert (label_groups(np.zeros(3, dtype=int), 0.5) == "cold").all()
    with pytest.raises(ConfigError):
        label_groups(pop, 0.0)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ConfigError, match="amazon-scientific.*climate-fever.*generic"):
        load_dataset(_params("dataset=movies"))


def test_generic_reads_csv_lists_and_jsonl(tmp_path):
    (tmp_path / "items.csv").write_text("item_id,text,brand\n007,first item,x\n8,second item,y\n9,third,z\n")
    (tmp_path / "q.csv").write_text(
        "query_id,split,history,target\n"
        'a,train,"[""007""]",8\n'
        "b,test,007 8,9\n"
        "c,valid,9,8\n"
    )
    items, queries = load_generic(_params("dataset=generic", f"data.generic.items={tmp_path / 'items.csv'}",
                                          f"data.generic.queries={tmp_path / 'q.csv'}"))
    assert items["item_id"].tolist() == ["007", "8", "9"] and "brand" in items.columns
    assert [list(h) for h in queries["history"]] == [["007"], ["007", "8"], ["9"]]
    assert items["popularity"].tolist() == [0, 1, 0]
    with open(tmp_path / "q.jsonl", "w") as fh:
        fh.write(json.dumps({"query_id": "s1", "split": "valid", "text": "find it", "targets": ["9", "8"]}) + "\n")
        fh.write(json.dumps({"query_id": "s2", "split": "train", "history": ["8"], "targets": ["9"]}) + "\n")
        fh.write(json.dumps({"query_id": "s3", "split": "test", "history": ["9"], "targets": ["8"]}) + "\n")
    _, q2 = load_generic(_params("dataset=generic", f"data.generic.items={tmp_path / 'items.csv'}",
                                 f"data.generic.queries={tmp_path / 'q.jsonl'}"))
    assert q2["emb_row"].tolist() == [0, -1, -1] and list(q2["targets"][0]) == ["9", "8"]
    pd.DataFrame({"item_id": [1, 2, 3], "text": ["x", "y", "z"]}).to_parquet(tmp_path / "items.parquet")
    pd.DataFrame({"query_id": ["p", "q", "r"], "split": ["train", "test", "valid"], "order": [5, 6, 7],
                  "history": [[1, 2] * 15, [3], [1]], "targets": [[3], [1, 2], [2]]}).to_parquet(tmp_path / "q.parquet")
    items3, q3 = load_generic(_params("dataset=generic", f"data.generic.items={tmp_path / 'items.parquet'}",
                                      f"data.generic.queries={tmp_path / 'q.parquet'}"))
    assert items3["item_id"].tolist() == ["1", "2", "3"] and items3["popularity"].tolist() == [0, 0, 1]
    assert list(q3["history"][0]) == ["1", "2"] * 10 and q3["order"].tolist() == [5, 6, 7]


def test_prepare_outputs_are_byte_identical(tmp_path):
    files = ("prepared/items.parquet", "prepared/queries.parquet", "metrics/popularity.json")
    outs = []
    for run in ("a", "b"):
        stats = run_prepare(_params("dataset=climate-fever", "data.max_users=300", f"out_dir={tmp_path / run}"))
        outs.append([(tmp_path / run / f).read_bytes() for f in files])
    assert outs[0] == outs[1]
    assert stats["n_queries"]["train"] + stats["n_queries"]["valid"] + stats["n_queries"]["test"] == 300
    items = pd.read_parquet(tmp_path / "a" / "prepared" / "items.parquet")
    head = items[items["group"] == "head"]
    assert head["popularity"].sum() >= 0.5 * items["popularity"].sum()
    assert head["popularity"].min() >= items.loc[items["group"] == "tail", "popularity"].max()

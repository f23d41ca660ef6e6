"""The generative retriever end to end on tiny synthetic catalogs (train, checkpoint, retrieve)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import recall_at, tiny_params, write_catalog

from components.retrieval.retrieve import generate, hallucination_rate, retrieve
from components.retrieval.retriever import decode, generate_sids, load_retriever
from components.retrieval.retriever_data import BucketBatchSampler, load_inputs, query_examples, training_pairs
from components.retrieval.retriever_train import run_train_retriever
from components.runtime.errors import ConfigError, DataError


def test_tiny_catalog_is_learned_from_indexing_pairs(tmp_path):
    items = write_catalog(tmp_path, train=False)
    params = tiny_params(tmp_path, epochs=40, batch_size=8)
    summary = run_train_retriever(params)
    assert summary["n_indexing_pairs"] == len(items) and summary["n_train_pairs"] == 0
    assert summary["index_kind"] == "history"
    model = load_retriever(tmp_path / "retriever" / "model.pt")
    model.attach_catalog(load_inputs(params).catalog)
    emb = torch.from_numpy(np.load(tmp_path / "embeddings" / "items.npy"))
    batch = {"kind": "history", "x": emb[:, None], "mask": torch.ones(len(emb), 1, dtype=torch.bool), "indexing": True,
             "hist_items": torch.arange(len(emb))[:, None]}
    res = decode(model, batch, beam=10)
    ranks = model.catalog.target_ranks(res.sid_index.numpy(), np.arange(len(items))[:, None])
    assert (ranks < 10).all()                                 # recall@10 = 1.0, the two cold items included
    assert (items["popularity"].to_numpy()[-2:] == 0).all()
    curve = pd.read_csv(tmp_path / "plots" / "retriever_curve.csv")
    assert list(curve.columns) == ["epoch", "train_loss", "val_recall@10"] and len(curve) == 40
    assert curve["train_loss"].iloc[-1] < curve["train_loss"].iloc[0] / 5
    assert curve["val_recall@10"].isna().all()                # no validation queries: the last epoch is kept
    metrics = json.loads((tmp_path / "metrics" / "retriever_train.json").read_text())
    assert metrics["best_epoch"] == 39 and metrics["best_val_recall@10"] is None


def test_ranked_frame_contract_and_hallucination(tmp_path):
    items = write_catalog(tmp_path)
    params = tiny_params(tmp_path, epochs=2, item_head=False, fusion={"sources": "none"})   # the paper's retriever
    run_train_retriever(params)
    queries = pd.read_parquet(tmp_path / "prepared" / "queries.parquet")
    ranked = retrieve(params, queries, beam=5)
    assert list(ranked.columns) == ["query_id", "rank", "item_id", "score", "sid"]
    pop = items.set_index("item_id")["popularity"]
    for _, grp in ranked.groupby("query_id"):
        assert grp["rank"].tolist() == list(range(len(grp)))
        assert grp["score"].is_monotonic_decreasing
        for _, same in grp.groupby("sid", sort=False):   # inside one SID: popularity desc, then item_id
            keys = list(zip(-pop[same.item_id].to_numpy(), same.item_id))
            assert keys == sorted(keys)
    assert ranked.groupby("query_id")["sid"].nunique().max() <= 5
    gen = generate(params, queries, beam=20, constrained=False)
    issued = set(ranked["sid"]) | {"-".join(map(str, c)) for c in pd.read_parquet(tmp_path / "sids" / "sid_table.parquet").codes}
    expect = (~gen["sid"].isin(issued)).groupby(gen["query_id"]).mean().mean()
    assert hallucination_rate(gen) == pytest.approx(expect)
    assert 0.0 < hallucination_rate(gen) <= 1.0           # 4*4*3 codes: most 20-beam outputs are not issued
    constrained = generate(params, queries, beam=20, constrained=True)
    assert hallucination_rate(constrained) == 0.0


def test_item_head_orders_inside_a_sid_and_the_fusion_is_tuned_on_validation(tmp_path):
    """Default retriever: the item scorer orders items of one SID, the checkpoint carries the fusion
    chosen on validation, and `retrieve` ranks exactly as that fusion of the four lists says; the
    bm25 list is the BM25 baseline's ranking."""
    from components.baselines.classic import bm25
    from components.retrieval.fusion import fuse
    from components.retrieval.retrieve import decode_queries, dense_side, generated_ranking, ranked_frame

    write_catalog(tmp_path)
    params = tiny_params(tmp_path, epochs=3, fusion={"sources": "auto", "weights": "auto", "depth": 5, "rrf_k": 60, "beam": 10})
    summary = run_train_retriever(params)
    grid, chosen = summary["fusion_grid"], summary["fusion"]
    assert summary["item_head"] and chosen["sources"] == ["learned", "zero_shot", "bm25"] and len(grid) == 286
    assert chosen["bm25_history"] == params["retriever"]["fusion"].get("bm25_history", 3)
    best = max(t["recall@10"] for t in grid)
    assert [t for t in grid if list(t["weights"].values()) == chosen["weights"]][0]["recall@10"] == best
    model = load_retriever(tmp_path / "retriever" / "model.pt")
    assert model.config["fusion"] == chosen
    queries = pd.read_parquet(tmp_path / "prepared" / "queries.parquet")
    dec = decode_queries(params, queries, model=model, beam=5)
    gen = generated_ranking(dec)
    sims = (dec.learned_query[gen.query] * dec.learned_items[gen.items]).sum(1)
    sid = dec.catalog.item_sid[gen.items]
    same = (gen.query[1:] == gen.query[:-1]) & (sid[1:] == sid[:-1])
    assert same.any() and (sims[1:][same] <= sims[:-1][same] + 1e-6).all()   # learned order inside one SID
    ranked = retrieve(params, queries, model=model, beam=5)
    assert chosen["depth"] == max(5, *params["eval"]["budgets"])   # every list reaches the deepest budget
    dense = [dense_side(dec, source, chosen["depth"], chosen["bm25_history"]) for source in chosen["sources"]]
    items = pd.read_parquet(tmp_path / "prepared" / "items.parquet")
    baseline = bm25(queries, items, chosen["depth"], last_n=chosen["bm25_history"])
    assert (dec.catalog.item_ids[dense[2].items] == baseline["item_id"].to_numpy()).all()
    expect = gen if chosen["weights"][0] == 1.0 else fuse([gen] + dense, chosen["weights"], 60, len(dec.catalog.item_ids))
    pd.testing.assert_frame_equal(ranked, ranked_frame(dec.query_ids, expect, dec.catalog))


def test_checkpoint_round_trip_and_determinism(tmp_path):
    write_catalog(tmp_path)
    params = tiny_params(tmp_path, epochs=2)
    run_train_retriever(params)
    path = tmp_path / "retriever" / "model.pt"
    blob = torch.load(path, weights_only=True)
    json.dumps(blob["config"])                               # the config is plain JSON
    first = {k: v.clone() for k, v in blob["state_dict"].items()}
    run_train_retriever(params)
    again = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(first[k], again[k]) for k in first)
    model = load_retriever(path)
    queries = pd.read_parquet(tmp_path / "prepared" / "queries.parquet")
    assert retrieve(params, queries, model=model).equals(retrieve(params, queries))


def test_text_queries_index_items_through_the_text_path(tmp_path):
    write_catalog(tmp_path, text=True)
    params = tiny_params(tmp_path, epochs=30)
    summary = run_train_retriever(params)
    assert summary["index_kind"] == "text" and summary["n_train_pairs"] == 36
    model = load_retriever(tmp_path / "retriever" / "model.pt")
    queries = pd.read_parquet(tmp_path / "prepared" / "queries.parquet")
    ranked = retrieve(params, queries, model=model)
    assert recall_at(ranked, queries, 10) >= 0.75             # query vectors are noisy copies of the target's
    sids, scores = generate_sids(model, {"kind": "text", "x": torch.from_numpy(np.load(tmp_path / "embeddings" / "items.npy")[:3, None]),
                                         "mask": torch.ones(3, 1, dtype=torch.bool)}, beam=4, constrained=True)
    table = set(map(tuple, pd.read_parquet(tmp_path / "sids" / "sid_table.parquet").codes.map(tuple)))
    assert all(s in table for q in sids for s in q) and all(len(q) == 4 for q in sids)


@pytest.mark.parametrize("backbone", ["t5", "pretrained"])
def test_hugging_face_backbones_train_and_reload(tmp_path, backbone):
    write_catalog(tmp_path)
    extra = {}
    if backbone == "pretrained":
        from transformers import T5Config, T5ForConditionalGeneration

        torch.manual_seed(0)
        T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                            decoder_start_token_id=0)).save_pretrained(tmp_path / "t5")
        extra["pretrained_path"] = str(tmp_path / "t5")
    params = tiny_params(tmp_path, backbone=backbone, epochs=1, **extra)
    run_train_retriever(params)
    model = load_retriever(tmp_path / "retriever" / "model.pt")
    assert model.config["backbone"] == backbone
    queries = pd.read_parquet(tmp_path / "prepared" / "queries.parquet").head(5)
    ranked = retrieve(params, queries, model=model, beam=4)
    assert ranked.query_id.nunique() == 5


def test_bad_inputs_are_named(tmp_path):
    write_catalog(tmp_path)
    with pytest.raises(ConfigError, match="finetune_text_encoder"):
        run_train_retriever(tiny_params(tmp_path, finetune_text_encoder=True))
    with pytest.raises(ConfigError, match="retriever.backbone"):
        run_train_retriever(tiny_params(tmp_path, backbone="gpt"))
    table = pd.read_parquet(tmp_path / "sids" / "sid_table.parquet")
    table.at[7, "codes"] = [9, 0]
    table.at[7, "length"] = 2
    table.to_parquet(tmp_path / "sids" / "sid_table.parquet", index=False)
    with pytest.raises(DataError, match=r"sid_table.parquet, column 'codes', rows \[7\]"):
        run_train_retriever(tiny_params(tmp_path))


def test_bucket_batches_are_homogeneous_complete_and_seeded():
    keys = np.repeat([1, 2, 5, 10_003], [7, 30, 1, 12])
    sampler = BucketBatchSampler(keys, batch_size=8, shuffle=True, seed=3)
    first = [b.tolist() for b in sampler]
    assert len(first) == len(sampler)
    assert all(len(set(keys[b])) == 1 and len(b) <= 8 for b in first)
    assert sorted(i for b in first for i in b) == list(range(len(keys)))
    assert first == [b.tolist() for b in BucketBatchSampler(keys, 8, True, seed=3)]
    sampler.set_epoch(1)
    assert [b.tolist() for b in sampler] != first


def test_bucket_batches_are_sharded_over_ranks():
    keys = np.repeat([1, 2, 5], [7, 30, 9])
    whole = [b.tolist() for b in BucketBatchSampler(keys, 4, True, seed=3)]
    shards = [[b.tolist() for b in BucketBatchSampler(keys, 4, True, seed=3, rank=r, replicas=3)] for r in range(3)]
    assert [len(s) for s in shards] == [len(BucketBatchSampler(keys, 4, True, seed=3, rank=1, replicas=3))] * 3
    assert len(shards[0]) == -(-len(whole) // 3)                  # every rank takes as many steps (DDP)
    assert [b for step in zip(*shards) for b in step][: len(whole)] == whole   # round-robin, same order


def test_query_examples_explode_targets_and_name_unknown_items():
    index = pd.Index(["a", "b", "c", "d"])
    q = pd.DataFrame({"query_id": ["q0", "q1"], "history": [["a", "b", "c"], []], "text": [None, "hi"],
                      "targets": [["d"], ["a", "c"]], "emb_row": [-1, 0]})
    ex = query_examples(q, index, q["emb_row"].to_numpy(), max_history=2)
    assert ex.hist[0].tolist() == [1, 2] and ex.hist_len.tolist() == [2, 0]   # the last 2 items, oldest first
    pairs = training_pairs(ex)
    assert pairs.sid.tolist() == [3, 0, 2] and pairs.query.tolist() == [0, 1, 1]
    bad = q.assign(history=[["a", "zz"], []])
    with pytest.raises(DataError, match=r"column 'history', rows \[0\]"):
        query_examples(bad, index, q["emb_row"].to_numpy(), max_history=2)

"""The MiniLM encoder: deterministic, normalised, cut at max_chars; run_embed's files and order;
the vector cache (a killed embed resumes, a grown catalog encodes only its new texts)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

import components.data.embed
from components.data.embed import EMBED_DIM, encode_texts, load_encoder, one_shot_order, run_embed, text_cache
from components.data.prepare import run_prepare
from components.runtime.config import load_params

TEXTS = ["a cordless drill with two batteries", "nitrile lab gloves, size M", "a digital caliper, 150 mm",
         "heavy duty staples for a staple gun"]


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


def test_encode_is_deterministic_and_normalised(encoder):
    a = encode_texts(TEXTS, batch_size=2)
    b = encode_texts(list(reversed(TEXTS)), batch_size=3)[::-1]
    assert a.dtype == np.float32 and a.shape == (4, EMBED_DIM)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.array_equal(a, encode_texts(TEXTS, batch_size=2))
    sims = a @ a.T
    assert sims[0, 1] < 0.9  # different products get different vectors
    assert encode_texts([], batch_size=2).shape == (0, EMBED_DIM)


def test_max_chars_cuts_before_encoding(encoder):
    long = TEXTS[0] + " and then a long unrelated story about oceans and whales" * 5
    cut = encode_texts([long], max_chars=len(TEXTS[0]))
    assert np.array_equal(cut, encode_texts([TEXTS[0]], max_chars=len(TEXTS[0])))
    assert not np.allclose(cut, encode_texts([long], max_chars=10_000), atol=1e-3)


@pytest.mark.parametrize("query_kind", ["text", "history"])
def test_run_embed_rows_follow_items_and_emb_row(encoder, tmp_path, query_kind):
    (tmp_path / "items.csv").write_text("item_id,text\nb,nitrile gloves\na,cordless drill\nc,staples\n")
    if query_kind == "text":
        queries = "query_id,split,text,target\nq2,train,gloves for the lab,b\nq3,valid,staples,c\nq1,test,a drill,a\n"
    else:
        queries = "query_id,split,history,target\nq1,train,b,a\nq3,valid,a,b\nq2,test,b a,c\n"
    (tmp_path / "q.csv").write_text(queries)
    params = load_params(ROOT / "params.yaml", [
        "dataset=generic", f"out_dir={tmp_path / 'out'}", "embed.max_chars=50",
        f"data.generic.items={tmp_path / 'items.csv'}", f"data.generic.queries={tmp_path / 'q.csv'}"])
    run_prepare(params)
    stats = run_embed(params)
    items = np.load(tmp_path / "out" / "embeddings" / "items.npy")
    queries_emb = np.load(tmp_path / "out" / "embeddings" / "queries.npy")
    np.testing.assert_allclose(items, encode_texts(["nitrile gloves", "cordless drill", "staples"]), atol=1e-6)
    if query_kind == "text":
        np.testing.assert_allclose(queries_emb, encode_texts(["gloves for the lab", "staples", "a drill"]), atol=1e-6)
        assert stats["n_texts"] == 6 and stats["n_encoded"] == 5 and stats["n_cached"] == 1  # "staples" twice
    else:
        assert queries_emb.shape == (0, EMBED_DIM) and queries_emb.dtype == np.float32
        assert stats["n_texts"] == 3
    assert stats["texts_per_second"] > 0
    assert (tmp_path / "out" / "metrics" / "embed.json").exists()


CATALOG = [f"{a} {b}" for a in ("red", "blue", "steel", "glass") for b in ("lamp", "chair", "beaker")]


def _catalog_params(root: Path, texts: list[str], *extra: str) -> dict:
    """A prepared catalog of `texts` (history queries) under root/out; batches of 2, shards of 2 batches."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "items.csv").write_text("item_id,text\n" + "".join(f"i{k},{t}\n" for k, t in enumerate(texts)))
    (root / "q.csv").write_text("query_id,split,history,target,text\nq1,train,i0,i1,a lamp\nq2,valid,i1,i2,\n"
                                "q3,test,i2,i0,a chair\n")
    params = load_params(ROOT / "params.yaml", [
        "dataset=generic", f"out_dir={root / 'out'}", "embed.batch_size=2", "embed.cache_every_batches=2",
        f"data.generic.items={root / 'items.csv'}", f"data.generic.queries={root / 'q.csv'}", *extra])
    run_prepare(params)
    return params


class _Counting:
    """Wraps encode_texts: records every text it encodes; raises once `fail_after` calls are done."""

    def __init__(self, fail_after: int | None = None):
        self.texts: list[str] = []
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, texts, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("killed")
        self.calls += 1
        self.texts += list(texts)
        return encode_texts(texts, **kwargs)


def test_killed_embed_resumes_and_matches_an_uninterrupted_run(encoder, tmp_path, monkeypatch):
    params = _catalog_params(tmp_path / "a", CATALOG)
    texts = pd.read_parquet(tmp_path / "a" / "out" / "prepared" / "items.parquet")["text"].tolist()
    order = [texts[i] for i in one_shot_order(texts)]         # longest first, as one encode call batches them
    queries = [["a lamp", "a chair"][i] for i in one_shot_order(["a lamp", "a chair"])]
    killed = _Counting(fail_after=2)                           # dies in the second chunk (2 batches of 2)
    monkeypatch.setattr(components.data.embed, "encode_texts", killed)
    with pytest.raises(RuntimeError, match="killed"):
        run_embed(params)
    assert killed.texts == order[:4] and not (tmp_path / "a" / "out" / "embeddings").exists()
    resumed = _Counting()
    monkeypatch.setattr(components.data.embed, "encode_texts", resumed)
    stats = run_embed(params)
    assert resumed.texts == order[4:] + queries and stats["n_encoded"] == 10
    fresh = _Counting()
    monkeypatch.setattr(components.data.embed, "encode_texts", fresh)
    run_embed(_catalog_params(tmp_path / "b", CATALOG))
    assert fresh.texts == order + queries
    for name in ("items.npy", "queries.npy"):
        got, want = (np.load(tmp_path / run / "out" / "embeddings" / name) for run in ("a", "b"))
        assert np.array_equal(got, want), name
    # the same bits as one encode of everything: the same batches, so a cache never moves what is trained
    assert np.array_equal(np.load(tmp_path / "a" / "out" / "embeddings" / "items.npy"),
                          encode_texts(texts, batch_size=2))


def test_grown_catalog_and_retrain_encode_only_new_texts(encoder, tmp_path, monkeypatch):
    from flows.retrain_flow import embed_task

    params = _catalog_params(tmp_path, CATALOG)
    run_embed(params)
    before = np.load(tmp_path / "out" / "embeddings" / "items.npy")
    new = ["copper kettle", "oak shelf"]
    params = _catalog_params(tmp_path, CATALOG + new)
    counting = _Counting()
    monkeypatch.setattr(components.data.embed, "encode_texts", counting)
    stats = run_embed(params)
    assert counting.texts == new and stats["n_cached"] == len(CATALOG) + 2
    after = np.load(tmp_path / "out" / "embeddings" / "items.npy")
    assert np.array_equal(after[: len(CATALOG)], before)
    np.testing.assert_allclose(after[len(CATALOG):], encode_texts(new), atol=1e-6)
    counting.texts.clear()
    retrain_new = ["zinc funnel", "oak shelf"]  # a retrain run embeds its new items through the same cache
    vectors = embed_task.fn(params, retrain_new)
    assert counting.texts == ["zinc funnel"] and np.array_equal(vectors[1], after[-1])


def test_cache_off_or_damaged_shard_falls_back_to_encoding(encoder, tmp_path, monkeypatch):
    params = _catalog_params(tmp_path, CATALOG[:3], "embed.cache=false")
    assert run_embed(params)["n_encoded"] == 5 and not (tmp_path / "out" / "embed_cache").exists()
    params["embed"]["cache"] = True
    run_embed(params)
    shards = sorted((tmp_path / "out" / "embed_cache").glob("shard-*.npz"))
    assert len(shards) == 2 and text_cache(params).folder == tmp_path / "out" / "embed_cache"
    for shard in shards:  # e.g. a disk error: the shard is skipped and its texts encoded again
        shard.write_bytes(shard.read_bytes()[:50])
    counting = _Counting()
    monkeypatch.setattr(components.data.embed, "encode_texts", counting)
    with pytest.warns(UserWarning, match="unreadable embedding cache shard"):
        stats = run_embed(params)
    assert stats["n_encoded"] == 5 and sorted(counting.texts) == sorted(CATALOG[:3] + ["a lamp", "a chair"])

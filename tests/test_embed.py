"""The MiniLM encoder: deterministic, normalised, cut at max_chars; run_embed's files and order."""
from __future__ import annotations

import numpy as np
import pytest

from components.config import load_params
from components.embed import EMBED_DIM, encode_texts, load_encoder, run_embed
from components.prepare import run_prepare
from conftest import ROOT

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
        queries = "query_id,split,text,target\nq2,train,gloves for the lab,b\nq1,test,a drill,a\n"
    else:
        queries = "query_id,split,history,target\nq1,train,b,a\nq2,test,b a,c\n"
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
        np.testing.assert_allclose(queries_emb, encode_texts(["gloves for the lab", "a drill"]), atol=1e-6)
        assert stats["n_texts"] == 5
    else:
        assert queries_emb.shape == (0, EMBED_DIM) and queries_emb.dtype == np.float32
        assert stats["n_texts"] == 3
    assert stats["texts_per_second"] > 0
    assert (tmp_path / "out" / "metrics" / "embed.json").exists()

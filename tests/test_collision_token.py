"""TIGER's collision token (tokenizer.collision_token): unique SIDs for rqvae and rqkmeans,
numbering per shared prefix, the retriever on 4-layer SIDs, new items, and the config check."""
from __future__ import annotations

import json
import shutil
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_params as retriever_params
from helpers import write_catalog
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import make_catalog, run_tokenizer, tiny_params

from components.retrieval.retriever import decode, load_retriever
from components.retrieval.retriever_data import load_inputs
from components.retrieval.retriever_train import run_train_retriever
from components.runtime.errors import ConfigError
from components.tokenizers.sid_table import (
    collision_codes,
    collision_layer_size,
    make_sid_table,
    next_collision_codes,
    read_sid_table,
)


def _groups(prefixes, codes) -> dict[tuple, list[int]]:
    out: dict[tuple, list[int]] = defaultdict(list)
    for p, c in zip(prefixes, codes):
        out[tuple(p)].append(c)
    return out


# ---- the numbering ------------------------------------------------------------------------

def test_collision_codes_follow_popularity_then_row():
    prefixes = [[0, 1], [0, 1], [2, 2], [0, 1], [2, 2], [3, 0]]
    popularity = [5, 9, 1, 5, 1, 0]
    assert collision_codes(prefixes, popularity) == [1, 0, 0, 2, 1, 0]


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 4)), min_size=0, max_size=40))
def test_collision_codes_are_a_permutation_per_prefix(rows):
    prefixes = [[a, b] for a, b, _ in rows]
    popularity = [p for _, _, p in rows]
    codes = collision_codes(prefixes, popularity)
    assert len({(a, b, c) for (a, b), c in zip(prefixes, codes)}) == len(rows)        # unique SIDs
    for key, got in _groups(prefixes, codes).items():
        assert sorted(got) == list(range(len(got)))
        members = [r for r, p in enumerate(prefixes) if tuple(p) == key]
        by_code = sorted(members, key=lambda r: codes[r])
        assert by_code == sorted(members, key=lambda r: (-popularity[r], r))
    assert collision_layer_size(codes) >= max(codes, default=-1) + 1


def test_collision_layer_size_rounds_up_to_eight():
    assert [collision_layer_size(c) for c in ([], [0], [7], [8], [0, 20])] == [1, 8, 8, 16, 24]


def test_new_items_take_the_next_free_code_of_their_prefix():
    issued = [[0, 1, 0], [0, 1, 2], [3, 3, 0]]
    assert next_collision_codes(issued, [[0, 1], [5, 5], [0, 1], [3, 3]]) == [3, 0, 4, 1]


# ---- the tokenizer stages -----------------------------------------------------------------

@pytest.fixture(scope="module", params=["rqvae", "rqkmeans"])
def tables(request, tmp_path_factory) -> dict:
    """The same tiny catalog and seed tokenized without and with the collision token."""
    runs: dict = {"method": request.param}
    for flag in ("false", "true"):
        out = tmp_path_factory.mktemp(f"{request.param}_{flag}")
        make_catalog(out)
        runs[flag] = run_tokenizer(tiny_params(out, request.param, f"tokenizer.collision_token={flag}"))
        runs[f"{flag}_out"] = out
    return runs


def test_collision_token_makes_every_sid_unique(tables):
    plain, tiger = tables["false"], tables["true"]
    assert plain["codes"].map(tuple).duplicated().any()          # the tiny catalog collides without it
    assert not tiger["codes"].map(tuple).duplicated().any()
    assert set(tiger["length"]) == {4}
    stats = json.loads((tables["true_out"] / "metrics" / "sid_stats.json").read_text())
    plain_stats = json.loads((tables["false_out"] / "metrics" / "sid_stats.json").read_text())
    assert stats["unique_share"] == 1.0 and stats["n_sids"] == len(tiger)
    assert stats["collision"]["prefix_unique_share"] == pytest.approx(plain_stats["unique_share"])


def test_prefix_is_unchanged_and_numbered_per_shared_sid(tables):
    plain, tiger = tables["false"], tables["true"]
    assert [c[:3] for c in tiger["codes"]] == plain["codes"].tolist()
    items = pd.read_parquet(tables["true_out"] / "prepared" / "items.parquet")
    assert [c[3] for c in tiger["codes"]] == collision_codes(plain["codes"].tolist(), items["popularity"])
    for got in _groups(plain["codes"], [c[3] for c in tiger["codes"]]).values():
        assert sorted(got) == list(range(len(got)))


def test_meta_gains_the_collision_layer(tables):
    plain = json.loads((tables["false_out"] / "sids" / "meta.json").read_text())
    meta = json.loads((tables["true_out"] / "sids" / "meta.json").read_text())
    largest = max(c[3] for c in tables["true"]["codes"]) + 1
    assert meta["codebook_sizes"][:3] == plain["codebook_sizes"] and len(meta["codebook_sizes"]) == 4
    assert meta["codebook_sizes"][3] == collision_layer_size([largest - 1]) >= largest
    assert meta["max_len"] == meta["min_len"] == 4 and meta["collision_token"] is True
    assert plain["collision_token"] is False


@pytest.mark.parametrize("method", ["acrq", "sarq", "sa2crq", "import"])
def test_adaptive_and_imported_methods_refuse_the_collision_token(tmp_path, method):
    with pytest.raises(ConfigError, match="tokenizer.collision_token") as err:
        tiny_params(tmp_path, method, "tokenizer.collision_token=true", "tokenizer.import_path=x.json")
    assert err.value.key == "tokenizer.collision_token"


def test_collision_token_must_be_a_bool(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer.collision_token"):
        tiny_params(tmp_path, "rqvae", "tokenizer.collision_token=yes please")


# ---- consumers ----------------------------------------------------------------------------

def test_retriever_trains_and_decodes_on_collision_sids(tmp_path):
    """Four items share each 3-code prefix; only the collision token tells them apart."""
    items = write_catalog(tmp_path, n_items=24, train=False)
    prefixes = [[j % 3, (j // 3) % 2, 0] for j in range(len(items))]
    extra = collision_codes(prefixes, items["popularity"])
    codes = [[*p, k] for p, k in zip(prefixes, extra)]
    make_sid_table(items["item_id"], codes, "full", "t1").to_parquet(tmp_path / "sids" / "sid_table.parquet")
    sizes = [3, 2, 1, collision_layer_size(extra)]
    (tmp_path / "sids" / "meta.json").write_text(json.dumps(
        {"method": "rqvae", "codebook_sizes": sizes, "anchor_sizes": sizes, "max_len": 4, "min_len": 4,
         "version": "t1", "tau": None, "collision_token": True}))
    params = retriever_params(tmp_path, epochs=40, batch_size=8)
    summary = run_train_retriever(params)
    assert summary["n_indexing_pairs"] == len(items)
    model = load_retriever(tmp_path / "retriever" / "model.pt")
    catalog = load_inputs(params).catalog
    assert model.vocab.max_len == catalog.max_len == 4
    model.attach_catalog(catalog)
    emb = torch.from_numpy(np.load(tmp_path / "embeddings" / "items.npy"))
    batch = {"kind": "history", "x": emb[:, None], "mask": torch.ones(len(emb), 1, dtype=torch.bool), "indexing": True,
             "hist_items": torch.arange(len(emb))[:, None]}
    res = decode(model, batch, beam=10)
    ranks = model.catalog.target_ranks(res.sid_index.numpy(), np.arange(len(items))[:, None])
    assert (ranks < 10).all()
    assert (ranks == 0).mean() >= 0.5          # one item per SID: the token picks the item itself


def test_candidate_catalog_gives_new_items_free_collision_codes(tables, tmp_path):
    """flows.catalog_update with the frozen tokenizer: old SIDs unchanged, new ones unique."""
    from components.tokenizers.sid_tokenizer import assign_new_items, load_tokenizer
    from flows.catalog_update import write_candidate

    base = tmp_path / "base"
    shutil.copytree(tables["true_out"], base)
    pd.DataFrame({"query_id": ["q"]}).to_parquet(base / "prepared" / "queries.parquet")
    emb = np.load(base / "embeddings" / "items.npy")
    new_emb = np.repeat(emb[:3], 4, axis=0)                      # 4 copies each: they must share prefixes
    new_items = pd.DataFrame({"item_id": [f"n{k}" for k in range(len(new_emb))], "text": "new"})
    tok = load_tokenizer(tiny_params(base, tables["method"], "tokenizer.collision_token=true"))
    codes, _, _ = assign_new_items(tok, new_emb, None)
    cand = tmp_path / "cand"
    write_candidate(base, cand, new_items, new_emb, codes, tok, "v2")
    old = read_sid_table(base / "sids" / "sid_table.parquet")
    table = read_sid_table(cand / "sids" / "sid_table.parquet")
    assert table["codes"].tolist()[: len(old)] == old["codes"].tolist()
    assert not table["codes"].map(tuple).duplicated().any()
    new = table["codes"].tolist()[len(old):]
    assert [c[:3] for c in new] == codes
    meta = json.loads((cand / "sids" / "meta.json").read_text())
    assert len(meta["codebook_sizes"]) == 4 and meta["codebook_sizes"][3] > max(c[3] for c in new)
    assert meta["codebook_sizes"][3] >= json.loads((base / "sids" / "meta.json").read_text())["codebook_sizes"][3]


def test_candidate_collision_layer_grows_when_a_prefix_outgrows_it():
    from flows.catalog_update import with_collision_codes

    old = make_sid_table(["a", "b"], [[0, 0, 0, 0], [0, 0, 0, 7]], "full", "v")
    meta = {"codebook_sizes": [1, 1, 1, 8], "collision_token": True}
    codes, size = with_collision_codes(old, meta, [[0, 0, 0], [1, 0, 0]])
    assert codes == [[0, 0, 0, 8], [1, 0, 0, 0]] and size == [16]
    assert with_collision_codes(old, {"collision_token": False}, [[0, 0, 0]]) == ([[0, 0, 0]], [])

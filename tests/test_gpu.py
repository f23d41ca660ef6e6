"""The same model on CUDA: decoding and retriever training follow the model's device.

Skipped without CUDA. Sessions that are lent a GPU run `pytest -m gpu` on it (docs/OPERATIONS.md
"Scaling out"); the CPU-only suite checks the device plumbing that does not need one
(`test_trie_follows_the_model_device`)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_retriever import recall_at, tiny_params, write_catalog

from components.retrieval.constrained_decoding import SidTrie
from components.retrieval.retrieve import retrieve
from components.retrieval.retriever import RetrieverModel, decode, load_retriever, model_config
from components.retrieval.retriever_train import run_train_retriever
from components.tokenizers.sid_vocab import SidCatalog

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _net(sizes=(4, 5, 3)) -> RetrieverModel:
    torch.manual_seed(0)
    rp = {"backbone": "small", "d_model": 16, "n_heads": 2, "n_layers": 1, "ff_dim": 32, "dropout": 0.0, "n_memory": 2}
    net = RetrieverModel(model_config(rp, sizes, 8, 6)).eval()
    rng = np.random.default_rng(1)
    codes = [list(rng.integers(0, sizes[: int(rng.integers(1, 4))])) for _ in range(40)]
    net.attach_catalog(SidCatalog.build(np.array([f"i{j}" for j in range(40)]), rng.integers(0, 5, 40), codes, 3))
    return net


def _batch() -> dict:
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(5, 4, 8)).astype(np.float32))
    return {"kind": "history", "x": x, "mask": torch.ones(5, 4, dtype=torch.bool)}


def test_trie_follows_the_model_device():
    trie = _net().trie
    assert trie.on(torch.device("cpu")) is trie
    meta = trie.on(torch.device("meta"))
    assert all(t.device.type == "meta" for t in meta.tables) and trie.on(torch.device("meta")) is meta
    assert isinstance(meta, SidTrie) and all(t.device.type == "cpu" for t in trie.tables)


@pytest.mark.gpu
@cuda
def test_decoding_on_cuda_matches_cpu():
    net = _net()
    on_cpu = decode(net, _batch(), beam=12)
    on_gpu = decode(net.cuda(), _batch(), beam=12)          # a CPU batch: decode moves it to the model
    assert on_gpu.sid_index.device.type == "cuda"
    assert torch.equal(on_gpu.sid_index.cpu(), on_cpu.sid_index)
    torch.testing.assert_close(on_gpu.scores.cpu(), on_cpu.scores, atol=1e-4, rtol=0)


@pytest.mark.gpu
@cuda
def test_retriever_trains_and_retrieves_on_cuda(tmp_path):
    write_catalog(tmp_path)
    params = tiny_params(tmp_path, epochs=3)
    params["retriever"]["trainer"].update(accelerator="gpu", devices=1)
    run_train_retriever(params)
    model = load_retriever(tmp_path / "retriever" / "model.pt").cuda()
    queries = pd.read_parquet(tmp_path / "prepared" / "queries.parquet")
    ranked = retrieve(params, queries, model=model, beam=10)
    assert ranked.query_id.nunique() == len(queries) and recall_at(ranked, queries, 10) > 0


@pytest.mark.gpu
@cuda
def test_tokenizer_and_two_tower_train_on_cuda(tmp_path):
    """The smoke tokenizer (SA2CRQ: Stage 1 with SARQ callbacks, Stage 2) and the two-tower
    baseline on `accelerator: gpu`: every item gets a SID and the models come back on the CPU."""
    from test_baselines import history_queries
    from tokenizer_fixtures import make_catalog, run_tokenizer
    from tokenizer_fixtures import tiny_params as tokenizer_params

    from components.baselines.two_tower import train_two_tower
    from components.tokenizers.sid_tokenizer import load_checkpoint

    items, x = make_catalog(tmp_path)
    params = tokenizer_params(tmp_path, "sa2crq", "profile=smoke", "tokenizer.accelerator=gpu",
                              "tokenizer.codebook_sizes=[4,8,8]", "tokenizer.extension_sizes=[2,4,4]")
    table = run_tokenizer(params)
    assert len(table) == len(items) and (table["length"] >= 1).all()
    assert load_checkpoint(tmp_path / "tokenizer" / "head.pt")["history"]
    n = len(items)
    train = history_queries([[items.item_id[i % n]] for i in range(200)])
    train["targets"] = [[items.item_id[(i + 1) % n]] for i in range(200)]
    cfg = {"dim": 16, "max_len": 4, "n_memory": 2, "dropout": 0.0, "lr": 0.03, "temperature": 0.1,
           "batch_size": 50, "epochs": 2, "patience": 0, "accelerator": "gpu"}
    model = train_two_tower(train, items, x, None, cfg, seed=0, valid=train.head(20))
    assert model.fit_result.best_score is not None and next(model.parameters()).device.type == "cpu"

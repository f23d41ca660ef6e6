"""The same model on CUDA: decoding and retriever training follow the model's device.

Skipped without CUDA. Sessions that are lent a GPU run `pytest -m gpu` on it (docs/OPERATIONS.md
"Scaling out"); the CPU-only suite checks the device plumbing that does not need one
(`test_trie_follows_the_model_device`)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import history_queries, plain_retriever, recall_at, tiny_params, write_catalog

from components.retrieval.constrained_decoding import SidTrie
from components.retrieval.retrieve import retrieve
from components.retrieval.retriever import RetrieverModel, decode, load_retriever, model_config
from components.retrieval.retriever_train import run_train_retriever
from components.tokenizers.sid_vocab import SidCatalog

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _net(sizes=(4, 5, 3)) -> RetrieverModel:
    torch.manual_seed(0)
    rp = {"backbone": "small", "d_model": 16, "n_heads": 2, "n_layers": 1, "ff_dim": 32, "dropout": 0.0, "n_memory": 2}
    net = RetrieverModel(model_config(plain_retriever(**rp), sizes, 8, 6)).eval()
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


def _same_ranking(on_gpu: pd.DataFrame, on_cpu: pd.DataFrame) -> None:
    """Two ranked frames hold the same items per query, with scores equal within float32 noise at each rank."""
    key = ["query_id", "rank"]
    both = on_gpu.merge(on_cpu, on=key, how="outer", suffixes=("_gpu", "_cpu"), indicator=True)
    assert (both["_merge"] == "both").all() and len(both) == len(on_cpu)
    np.testing.assert_allclose(both["score_gpu"], both["score_cpu"], atol=1e-4, rtol=0)
    items = {side: frame.groupby("query_id")["item_id"].agg(frozenset) for side, frame in (("gpu", on_gpu),
                                                                                          ("cpu", on_cpu))}
    pd.testing.assert_series_equal(items["gpu"], items["cpu"])


@pytest.mark.gpu
@cuda
def test_retriever_trained_on_cuda_retrieves_the_same_on_cuda_and_cpu(tmp_path):
    """A retriever trained with `accelerator: gpu` comes back on the CPU, learns the tiny catalog, and
    `retrieve` gives the same items and scores with the model on CUDA as on the CPU."""
    write_catalog(tmp_path)
    params = tiny_params(tmp_path, epochs=3)
    params["retriever"]["trainer"].update(accelerator="gpu", devices=1)
    run_train_retriever(params)
    model = load_retriever(tmp_path / "retriever" / "model.pt")
    queries = pd.read_parquet(tmp_path / "prepared" / "queries.parquet")
    on_cpu = retrieve(params, queries, model=model, beam=10)
    on_gpu = retrieve(params, queries, model=model.cuda(), beam=10)
    assert next(model.parameters()).device.type == "cuda"
    _same_ranking(on_gpu, on_cpu)
    assert on_cpu.query_id.nunique() == len(queries) and recall_at(on_cpu, queries, 10) > 0


@pytest.mark.gpu
@cuda
def test_tokenizer_and_two_tower_trained_on_cuda_compute_the_same_on_cuda_and_cpu(tmp_path):
    """The smoke tokenizer (SA2CRQ: Stage 1 with SARQ callbacks, Stage 2) and the two-tower baseline
    trained on `accelerator: gpu`: the RQ-VAE encodes the catalog to the same latents on CUDA as on the
    CPU, the SID table written holds the tokenizer's own assignment of the non-head items, and the two-tower's
    scores on CUDA equal its scores on the CPU."""
    from tokenizer_fixtures import make_catalog, run_tokenizer
    from tokenizer_fixtures import tiny_params as tokenizer_params

    from components.baselines.two_tower import query_index_table, train_two_tower
    from components.tokenizers.sid_tokenizer import load_tokenizer

    items, x = make_catalog(tmp_path)
    params = tokenizer_params(tmp_path, "sa2crq", "profile=smoke", "tokenizer.accelerator=gpu",
                              "tokenizer.codebook_sizes=[4,8,8]", "tokenizer.extension_sizes=[2,4,4]")
    table = run_tokenizer(params)
    tokenizer = load_tokenizer(params)
    codes, lengths = tokenizer.assign(x)
    tail = (table["stage"] != "head").to_numpy()                 # head items keep the SIDs Stage 1 issued
    assert table["item_id"].tolist() == items["item_id"].tolist() and tail.sum() >= len(items) // 2
    assert table["codes"][tail].tolist() == [c[:n].tolist() for c, n in zip(codes[tail], lengths[tail])]
    encoder = tokenizer.model.encoder
    with torch.no_grad():
        on_cpu = encoder(torch.from_numpy(x))
        on_gpu = encoder.cuda()(torch.from_numpy(x).cuda()).cpu()
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-4, rtol=1e-4)

    n = len(items)
    train = history_queries([[items.item_id[i % n]] for i in range(200)])
    train["targets"] = [[items.item_id[(i + 1) % n]] for i in range(200)]
    cfg = {"dim": 16, "max_len": 4, "n_memory": 2, "dropout": 0.0, "lr": 0.03, "temperature": 0.1,
           "batch_size": 50, "epochs": 2, "patience": 0, "accelerator": "gpu"}
    model = train_two_tower(train, items, x, None, cfg, seed=0, valid=train.head(20))
    assert model.fit_result.best_score is not None and next(model.parameters()).device.type == "cpu"
    q_idx, is_text = (torch.from_numpy(a) for a in query_index_table(train, items, cfg["max_len"]))
    scores_cpu = model.scores(q_idx, is_text)
    scores_gpu = model.cuda().scores(q_idx.cuda(), is_text.cuda()).cpu()
    torch.testing.assert_close(scores_gpu, scores_cpu, atol=1e-4, rtol=1e-4)

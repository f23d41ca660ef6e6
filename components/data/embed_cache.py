"""Text vectors cached by content, so a killed embed resumes and a grown catalog encodes only what is new.

Key = sha256 of (model, max_chars, normalize, text cut to max_chars): the inputs that fix a
vector; an ONNX backend (embed.backend) adds its name and export recipe, so an int8 vector is never
served for an fp32 request (the torch backend's keys stay as they were: existing caches stay valid).
Shards are `.npz` files (keys + float32 rows) each written atomically, so a kill loses at most
the chunk being encoded and never leaves a half-written shard. The folder lives beside the DVC
outs (`<out_dir>/embed_cache/`), not in them: a stage's outs are deleted before it runs, and the
cache only grows. Deleting it is always safe.
"""
from __future__ import annotations

import hashlib
import json
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from components.runtime.atomic import atomic_path


class EmbedCache:
    """Vectors of one encoder setting (model, max_chars, normalize, backend) under `folder`.

    `backend` is None for the torch backend (fp32 sentence-transformers), else the backend and its
    export recipe (e.g. "onnx-int8/<recipe>"): it joins the key only when given."""

    def __init__(self, folder: str | Path, model: str, max_chars: int, normalize: bool, dim: int,
                 backend: str | None = None):
        self.folder = Path(folder)
        self.setting = [model, int(max_chars), bool(normalize), *([backend] if backend else [])]
        self.dim = dim

    def key(self, text: str) -> str:
        """The text is cut first, as the encoder would cut it: texts equal up to max_chars share a vector."""
        payload = json.dumps([*self.setting, str(text)[: self.setting[1]]], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()

    def lookup(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """The cached vectors among `keys`; an unreadable shard is skipped with a warning (its texts re-encode)."""
        wanted = set(keys)
        found: dict[str, np.ndarray] = {}
        for shard in sorted(self.folder.glob("shard-*.npz")) if wanted else []:
            try:
                with np.load(shard, allow_pickle=False) as data:
                    shard_keys, vectors = data["keys"], data["vectors"]
                if vectors.shape != (len(shard_keys), self.dim) or vectors.dtype != np.float32:
                    raise ValueError(f"vectors of shape {vectors.shape} / {vectors.dtype}")
            except Exception as exc:  # zip / npy readers raise several types for a damaged file
                warnings.warn(f"{shard}: unreadable embedding cache shard skipped ({exc}); delete it to silence this")
                continue
            for k, row in zip(shard_keys.tolist(), vectors):
                if k in wanted:
                    found[k] = row
        return found

    def add(self, keys: list[str], vectors: np.ndarray) -> None:
        """One new shard, written atomically (a unique name, so parallel runs never clash)."""
        with atomic_path(self.folder / f"shard-{uuid.uuid4().hex}.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, keys=np.asarray(keys, dtype="U64"), vectors=np.asarray(vectors, dtype=np.float32))

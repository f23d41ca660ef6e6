"""One served model version per traffic slot, and its reload when a new version is promoted.

A promotion renames folders under out_dir one at a time, so a load that overlaps it could read
the SID table of one version and the retriever of another. `load_version` therefore reads the live
version before and after loading and checks that the SID table and the retriever's checkpoint
name that same version; otherwise it raises `VersionChanged` and the slot keeps what it serves
(the next poll or /admin/reload tries again). The new version is loaded completely before the
slot's reference is swapped (one assignment): a batch that already took the old one finishes on it.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.data.embed import load_encoder
from components.retrieval.retrieve import DecodeContext, load_context
from components.tokenizers.sid_table import live_version


class VersionChanged(RuntimeError):
    """The live files changed while they were being read (a promotion in progress)."""


@dataclass(frozen=True)
class LoadedVersion:
    """A version ready to answer: its name, where it came from, and the decoding context."""

    version: str
    out_dir: Path
    context: DecodeContext


def load_version(params: dict, out_dir: Path) -> LoadedVersion:
    """Load the live version of out_dir; refuse a mix of two versions' files."""
    before = live_version(out_dir)
    ctx = load_context(params, out_dir=out_dir)
    after = live_version(out_dir)
    trained_on = str(ctx.model.config.get("sid_version", ctx.inputs.sid_version))
    if not before == after == ctx.inputs.sid_version == trained_on:
        raise VersionChanged(f"{out_dir}: live version changed while loading (live {before!r} then {after!r}, "
                             f"SID table {ctx.inputs.sid_version!r}, retriever trained on {trained_on!r})")
    if len(ctx.inputs.query_emb):
        load_encoder()   # a catalog with text queries: load MiniLM now, not inside the first text request
    # requests never name a prepared query's embedding row: drop queries.npy instead of copying it per batch
    inputs = dataclasses.replace(ctx.inputs, query_emb=np.zeros((0, ctx.inputs.item_emb.shape[1]), np.float32))
    return LoadedVersion(before, Path(out_dir), dataclasses.replace(ctx, inputs=inputs))


class ModelSlot:
    """The version a traffic slot (A or B) serves; `reload` swaps in a newly promoted one."""

    def __init__(self, params: dict, out_dir: Path):
        self.params, self.out_dir = params, Path(out_dir)
        self.current: LoadedVersion | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()   # one load at a time (the poller and /admin/reload may overlap)

    def reload(self, force: bool = False) -> bool:
        """Load the live version if it differs from the served one (or `force`); True when swapped."""
        with self._lock:
            try:
                if not force and self.current is not None and live_version(self.out_dir) == self.current.version:
                    return False
                loaded = load_version(self.params, self.out_dir)
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise
            self.current, self.last_error = loaded, None
            return True

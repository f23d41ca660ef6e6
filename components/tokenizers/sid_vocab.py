"""SIDs as decoder tokens, and SIDs as item groups.

`SidVocab` maps a variable-length SID (c_1, ..., c_L) to tokens of one flat vocabulary:
PAD, BOS, END, then the codes of layer 0, layer 1, ... at per-layer offsets (layers may have
different codebook sizes). `SidCatalog` holds the issued SIDs of a sid_table: the distinct
SIDs, the items behind each one in ranking order (popularity desc, then item_id), and the
reverse maps the decoder and the metrics need.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.runtime.errors import DataError
from components.runtime.safe_load import read_frame

PAD, BOS, END = 0, 1, 2
N_SPECIAL = 3


@dataclass(frozen=True)
class SidVocab:
    """Flat token vocabulary over per-layer codebooks (sizes may differ by layer)."""

    codebook_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.codebook_sizes or min(self.codebook_sizes) < 1:
            raise ValueError(f"codebook_sizes must be positive, got {self.codebook_sizes}")

    @property
    def max_len(self) -> int:
        return len(self.codebook_sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Token id of code 0 in each layer."""
        return tuple(int(x) for x in N_SPECIAL + np.concatenate([[0], np.cumsum(self.codebook_sizes)[:-1]]))

    @property
    def size(self) -> int:
        return N_SPECIAL + int(sum(self.codebook_sizes))

    def layer_columns(self, depth: int) -> np.ndarray:
        """Token ids the decoder may score at `depth`: the layer's codes, then END (last)."""
        off, k = self.offsets[depth], self.codebook_sizes[depth]
        return np.concatenate([np.arange(off, off + k), [END]]).astype(np.int64)

    def layer_mask(self) -> np.ndarray:
        """(max_len, size) bool: tokens valid as the output at each depth (END not at depth 0)."""
        mask = np.zeros((self.max_len, self.size), dtype=bool)
        for depth in range(self.max_len):
            mask[depth, self.layer_columns(depth)] = True
        mask[0, END] = False
        return mask

    def encode(self, codes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Padded codes (N, max_len) -> decoder inputs and targets, both (N, max_len).

        inputs = [BOS, tok_1, ..., tok_{max_len-1}]; targets = [tok_1, ..., tok_L, END, PAD...].
        A full-length SID needs no END target: nothing else can follow it.
        """
        n = len(codes)
        offsets = np.asarray(self.offsets, dtype=np.int64)
        pos = np.arange(self.max_len)[None, :]
        valid = pos < lengths[:, None]
        tokens = np.where(valid, codes + offsets[None, :], PAD)
        targets = np.where(pos == lengths[:, None], END, tokens)
        inputs = np.concatenate([np.full((n, 1), BOS), tokens[:, :-1]], axis=1)
        inputs = np.where(pos <= lengths[:, None], inputs, PAD)
        return inputs.astype(np.int64), targets.astype(np.int64)


def pad_codes(codes: list, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """List of code lists -> (N, max_len) int64 array padded with -1, and lengths."""
    lengths = np.fromiter((len(c) for c in codes), dtype=np.int64, count=len(codes))
    out = np.full((len(codes), max_len), -1, dtype=np.int64)
    if len(codes):
        flat = np.concatenate([np.asarray(c, dtype=np.int64) for c in codes]) if lengths.sum() else np.zeros(0, np.int64)
        rows = np.repeat(np.arange(len(codes)), lengths)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[rows, cols] = flat
    return out, lengths


def key_base(codes: np.ndarray) -> np.ndarray:
    """Per-position radix of `sid_keys` for codes (M, max_len), -1 padded: max code + 2 (0 = padding)."""
    base = np.maximum(codes.max(axis=0, initial=-1), 0).astype(np.int64) + 2
    if np.sum(np.log2(base)) >= 62:
        raise ValueError("codebooks too large for a 64-bit SID key")
    return base


def sid_keys(codes: np.ndarray, lengths: np.ndarray, base: np.ndarray) -> np.ndarray:
    """One int64 per SID, ordered like the code tuples (a shorter SID before its extensions)."""
    k = np.zeros(len(codes), dtype=np.int64)
    for t in range(codes.shape[1]):
        k = k * base[t] + np.where(t < lengths, codes[:, t] + 1, 0)
    return k


def sid_string(codes: tuple[int, ...] | np.ndarray) -> str:
    """SID as text: codes joined by '-' (the ranked-results `sid` column)."""
    return "-".join(str(int(c)) for c in codes)


@dataclass
class SidCatalog:
    """Issued SIDs and the items behind them, in the order results are ranked."""

    item_ids: np.ndarray          # (n_items,) str, item order of items.parquet
    popularity: np.ndarray        # (n_items,) int
    codes: np.ndarray             # (n_sids, max_len) int64, -1 padded: distinct issued SIDs
    lengths: np.ndarray           # (n_sids,)
    item_sid: np.ndarray          # (n_items,) sid index of each item
    group_ptr: np.ndarray         # (n_sids + 1,) CSR offsets into group_items
    group_items: np.ndarray       # item rows, per SID in popularity desc then item_id order
    item_pos: np.ndarray          # (n_items,) position of each item inside its SID group

    @classmethod
    def build(cls, item_ids: np.ndarray, popularity: np.ndarray, codes: list, max_len: int) -> SidCatalog:
        """Group items by SID (vectorised); SIDs are numbered in first-seen sorted code order."""
        padded, lengths = pad_codes(codes, max_len)
        # one int64 key per SID keeps the grouping O(n log n) on a 1-D sort (np.unique(axis=0) was 15x slower)
        _, first, item_sid = np.unique(sid_keys(padded, lengths, key_base(padded)), return_index=True,
                                       return_inverse=True)
        item_sid = item_sid.reshape(-1).astype(np.int64)
        uniq_codes, uniq_lengths = padded[first], lengths[first]
        item_ids = np.asarray(item_ids, dtype=object)
        popularity = np.asarray(popularity, dtype=np.int64)
        order = np.lexsort((item_ids.astype(str), -popularity, item_sid))
        counts = np.bincount(item_sid, minlength=len(first))
        ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        item_pos = np.empty(len(item_sid), dtype=np.int64)
        item_pos[order] = np.arange(len(order)) - ptr[item_sid[order]]
        return cls(item_ids, popularity, uniq_codes, uniq_lengths, item_sid, ptr, order.astype(np.int64), item_pos)

    @property
    def n_sids(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return self.codes.shape[1]

    @functools.cached_property
    def sid_text(self) -> np.ndarray:
        """Every issued SID as text (object array, sid order): built once, ranked frames index it."""
        return np.array([sid_string(self.codes[s, : self.lengths[s]]) for s in range(self.n_sids)], dtype=object)

    def sid_tuple(self, sid: int) -> tuple[int, ...]:
        return tuple(int(c) for c in self.codes[sid, : self.lengths[sid]])

    def lookup(self) -> dict[tuple[int, ...], int]:
        """SID tuple -> sid index (to tell issued SIDs from hallucinated ones)."""
        return {self.sid_tuple(s): s for s in range(self.n_sids)}

    def find(self, codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Sid index of each SID in codes (M, max_len) -1 padded, or -1 where none is issued."""
        base = key_base(np.concatenate([self.codes, codes]) if len(codes) else self.codes)
        issued = sid_keys(self.codes, self.lengths, base)
        order = np.argsort(issued)
        wanted = sid_keys(codes, lengths, base)
        pos = np.clip(np.searchsorted(issued[order], wanted), 0, len(order) - 1)
        return np.where(issued[order][pos] == wanted, order[pos], -1)

    def group_sizes(self) -> np.ndarray:
        return np.diff(self.group_ptr)

    def target_ranks(self, sid_index: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """0-based item rank of each target given beams sid_index (N, B) (-1 = empty slot).

        targets (N, T) item rows, -1 padded. A beam's SID contributes all its items at its
        place in the list; inf where a target was not retrieved (or is padding).
        """
        sizes = np.where(sid_index >= 0, self.group_sizes()[np.maximum(sid_index, 0)], 0)
        start = np.cumsum(sizes, axis=1) - sizes
        t_rows = np.maximum(targets, 0)
        t_sid = np.where(targets >= 0, self.item_sid[t_rows], -2)
        match = sid_index[:, None, :] == t_sid[:, :, None]
        beam_of = match.argmax(axis=2)
        rank = np.take_along_axis(start, beam_of, axis=1) + self.item_pos[t_rows]
        return np.where(match.any(axis=2), rank, np.inf)


def load_sid_table(sids_dir: str | Path, items: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Read sids/sid_table.parquet + meta.json and check them against items.parquet."""
    import json

    sids_dir = Path(sids_dir)
    table_path, meta_path = sids_dir / "sid_table.parquet", sids_dir / "meta.json"
    for p in (table_path, meta_path):
        if not p.exists():
            raise FileNotFoundError(f"{p}: missing (run the assign_ids step first)")
    table = read_frame(table_path)
    meta = json.loads(meta_path.read_text())
    for col in ("item_id", "codes", "length"):
        if col not in table.columns:
            raise DataError(table_path, "required column missing", column=col)
    if "codebook_sizes" not in meta or "max_len" not in meta:
        raise DataError(meta_path, "needs 'codebook_sizes' and 'max_len'")
    if len(table) != len(items) or not np.array_equal(table["item_id"].astype(str).to_numpy(),
                                                      items["item_id"].astype(str).to_numpy()):
        bad = np.flatnonzero(table["item_id"].astype(str).to_numpy()[: len(items)]
                             != items["item_id"].astype(str).to_numpy()[: len(table)])
        raise DataError(table_path, f"must list the {len(items)} items of items.parquet in the same order "
                        f"(has {len(table)} rows)", column="item_id", rows=bad.tolist() if len(bad) else [min(len(table), len(items))])
    sizes = [int(k) for k in meta["codebook_sizes"]]
    max_len = int(meta["max_len"])
    if len(sizes) < max_len:
        raise DataError(meta_path, f"codebook_sizes has {len(sizes)} layers but max_len is {max_len}")
    lengths = np.asarray([len(c) for c in table["codes"]])
    bad = np.flatnonzero((lengths != table["length"].to_numpy()) | (lengths < 1) | (lengths > max_len))
    if len(bad):
        raise DataError(table_path, f"length must equal len(codes) and lie in [1, {max_len}]", column="length", rows=bad.tolist())
    padded, _ = pad_codes(list(table["codes"]), max_len)
    limits = np.asarray(sizes[:max_len])[None, :]
    bad = np.flatnonzero(((padded >= limits) | (padded < -1) | ((padded == -1) & (np.arange(max_len) < lengths[:, None]))).any(1))
    if len(bad):
        raise DataError(table_path, f"codes outside the codebook sizes {sizes[:max_len]}", column="codes", rows=bad.tolist())
    return table, {"codebook_sizes": sizes[:max_len], "max_len": max_len, "version": str(meta.get("version", ""))}

"""Examples and batches for the generative retriever.

An example is a query (text: one embedding row; history: item rows, oldest first) with a
target SID (training) and/or target items (evaluation). Training pairs are (train query,
SID of each target item); indexing pairs are (an item as a one-item query, its SID) for
every item, head, tail and cold alike, so every issued SID is learned. Batches hold one
query kind and one history length each (no padding; history lengths vary 1..max_history),
in a seeded order that changes every epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from components.retrieval.query_encoders import HISTORY, TEXT
from components.runtime.errors import DataError
from components.runtime.paths import out_path
from components.runtime.safe_load import load_matrix, read_frame
from components.tokenizers.sid_vocab import PAD, SidCatalog, SidVocab, load_sid_table

KIND_TEXT, KIND_HISTORY = 0, 1


@dataclass
class RetrieverInputs:
    """Everything the retriever reads from the pipeline's earlier steps."""

    items: pd.DataFrame
    queries: pd.DataFrame
    item_emb: np.ndarray
    query_emb: np.ndarray
    catalog: SidCatalog
    codebook_sizes: tuple[int, ...]
    sid_version: str
    item_index: pd.Index = field(init=False)

    def __post_init__(self) -> None:
        self.item_index = pd.Index(self.items["item_id"].astype(str))


def load_inputs(params: dict, out_dir: str | Path | None = None, with_queries: bool = True) -> RetrieverInputs:
    """Read prepared items/queries, embeddings and the SID table; check they fit together."""
    root = Path(out_dir) if out_dir is not None else out_path(params)
    items_file = root / "prepared" / "items.parquet"
    queries_file = root / "prepared" / "queries.parquet"
    items = read_frame(items_file)
    for col in ("item_id", "popularity"):
        if col not in items.columns:
            raise DataError(items_file, "required column missing", column=col)
    queries = read_frame(queries_file) if with_queries else pd.DataFrame()
    item_emb = load_matrix(root / "embeddings" / "items.npy")
    query_path = root / "embeddings" / "queries.npy"
    query_emb = load_matrix(query_path) if query_path.exists() else np.zeros((0, item_emb.shape[1]), np.float32)
    if len(item_emb) != len(items):
        raise DataError(root / "embeddings" / "items.npy",
                        f"shape {item_emb.shape} does not match the {len(items)} rows of items.parquet")
    table, meta = load_sid_table(root / "sids", items)
    catalog = SidCatalog.build(items["item_id"].astype(str).to_numpy(), items["popularity"].to_numpy(),
                               list(table["codes"]), meta["max_len"])
    return RetrieverInputs(items, queries, item_emb.astype(np.float32, copy=False),
                           query_emb.astype(np.float32, copy=False), catalog, tuple(meta["codebook_sizes"]),
                           meta["version"])


@dataclass
class Examples:
    """Column arrays of examples; every field has one row per example."""

    kind: np.ndarray      # int8: KIND_TEXT | KIND_HISTORY
    vec_row: np.ndarray   # text: row of the text-vector matrix; -1 for history
    hist: np.ndarray      # (E, H) item rows, left-aligned, -1 padded
    hist_len: np.ndarray  # (E,)
    sid: np.ndarray       # (E,) target item row whose SID is learned; -1 = none
    targets: np.ndarray   # (E, T) target item rows for evaluation, -1 padded
    query: np.ndarray     # (E,) row of the source query frame; -1 marks an indexing pair

    def __len__(self) -> int:
        return len(self.kind)

    def take(self, idx: np.ndarray) -> Examples:
        return Examples(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    @staticmethod
    def concat(parts: list[Examples]) -> Examples:
        h = max(p.hist.shape[1] for p in parts)
        t = max(p.targets.shape[1] for p in parts)
        pad = lambda a, w: np.pad(a, ((0, 0), (0, w - a.shape[1])), constant_values=-1)  # noqa: E731
        return Examples(
            np.concatenate([p.kind for p in parts]), np.concatenate([p.vec_row for p in parts]),
            np.concatenate([pad(p.hist, h) for p in parts]), np.concatenate([p.hist_len for p in parts]),
            np.concatenate([p.sid for p in parts]), np.concatenate([pad(p.targets, t) for p in parts]),
            np.concatenate([p.query for p in parts]))

    def bucket_keys(self) -> np.ndarray:
        """Examples with equal keys can share a batch: same kind, task and history length."""
        return self.kind.astype(np.int64) * 10_000 + (self.query < 0) * 5_000 + self.hist_len


def _id_rows(lists: pd.Series, index: pd.Index, file: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Lists of item ids -> (flat item rows, list lengths); unknown ids raise DataError."""
    lengths = lists.map(len).to_numpy().astype(np.int64)
    flat = np.concatenate([np.asarray(v, dtype=object) for v in lists]) if lengths.sum() else np.zeros(0, object)
    rows = index.get_indexer(flat.astype(str)) if len(flat) else np.zeros(0, np.int64)
    if (rows < 0).any():
        owner = np.repeat(np.arange(len(lists)), lengths)[rows < 0]
        raise DataError(file, f"unknown item id {flat[rows < 0][0]!r} (not in prepared/items.parquet)",
                        column=column, rows=owner.tolist())
    return rows.astype(np.int64), lengths


def _lists(queries: pd.DataFrame, column: str) -> pd.Series:
    """A list column, with a missing column or null cells read as empty lists."""
    if column not in queries.columns:
        return pd.Series([[]] * len(queries), index=queries.index)
    return queries[column].map(lambda v: [] if v is None or (np.isscalar(v) and pd.isna(v)) else list(v))


def _ragged_to_padded(flat: np.ndarray, lengths: np.ndarray, width: int, keep_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ragged rows -> (n, width) -1 padded, left-aligned; keep_last cuts long rows from the front."""
    n = len(lengths)
    starts = np.cumsum(lengths) - lengths
    kept = np.minimum(lengths, width)
    first = starts + (lengths - kept if keep_last else 0)
    out = np.full((n, max(width, 1)), -1, dtype=np.int64)
    row = np.repeat(np.arange(n), kept)
    col = np.arange(kept.sum()) - np.repeat(np.cumsum(kept) - kept, kept)
    out[row, col] = flat[np.repeat(first, kept) + col]
    return out, kept


def query_examples(queries: pd.DataFrame, item_index: pd.Index, text_rows: np.ndarray, max_history: int,
                   file: str = "prepared/queries.parquet") -> Examples:
    """One example per query (no target SID): history queries keep their last max_history items."""
    hist_flat, hist_n = _id_rows(_lists(queries, "history"), item_index, file, "history")
    is_hist = hist_n > 0
    if (~is_hist & (text_rows < 0)).any():
        raise DataError(file, "query has neither history nor a text embedding row", column="emb_row",
                        rows=np.flatnonzero(~is_hist & (text_rows < 0)).tolist())
    hist, hist_len = _ragged_to_padded(hist_flat, hist_n, max_history, keep_last=True)
    tgt_flat, tgt_n = _id_rows(_lists(queries, "targets"), item_index, file, "targets")
    targets, _ = _ragged_to_padded(tgt_flat, tgt_n, int(tgt_n.max(initial=1)), keep_last=False)
    n = len(queries)
    return Examples(np.where(is_hist, KIND_HISTORY, KIND_TEXT).astype(np.int8), np.where(is_hist, -1, text_rows),
                    hist, np.where(is_hist, hist_len, 0), np.full(n, -1, np.int64), targets, np.arange(n))


def training_pairs(examples: Examples) -> Examples:
    """One (query, target) pair per target item of each query."""
    n_t = (examples.targets >= 0).sum(1)
    rep = np.repeat(np.arange(len(examples)), n_t)
    out = examples.take(rep)
    out.sid = examples.targets[examples.targets >= 0]
    return out


def indexing_pairs(n_items: int, kind: int, text_offset: int, width: int) -> Examples:
    """Every item as a one-item query (history kind) or as its own text vector (text kind)."""
    rows = np.arange(n_items, dtype=np.int64)
    hist = np.full((n_items, width), -1, dtype=np.int64)
    if kind == KIND_HISTORY:
        hist[:, 0] = rows
    return Examples(np.full(n_items, kind, np.int8), rows + text_offset if kind == KIND_TEXT else np.full(n_items, -1),
                    hist, np.full(n_items, 1 if kind == KIND_HISTORY else 0), rows, rows[:, None].copy(),
                    np.full(n_items, -1, np.int64))


class ExampleDataset(Dataset):
    """Indexed by an array of example positions (one whole batch): returns a batch dict."""

    def __init__(self, examples: Examples, text_vectors: np.ndarray, item_emb: np.ndarray,
                 vocab: SidVocab, catalog: SidCatalog):
        self.ex, self.text_vectors, self.item_emb, self.vocab = examples, text_vectors, item_emb, vocab
        codes, lengths = catalog.codes, catalog.lengths
        self.sid_inputs, self.sid_targets = vocab.encode(codes, lengths)
        self.item_sid = catalog.item_sid
        # SID tokens of every item (PAD beyond its length), for history_sid_tokens
        sid_tokens = np.where(codes >= 0, codes + np.asarray(vocab.offsets)[None, :], PAD)
        self.item_tokens = np.concatenate([sid_tokens[catalog.item_sid], np.full((1, vocab.max_len), PAD)])

    def __len__(self) -> int:
        return len(self.ex)

    def __getitem__(self, idx: np.ndarray) -> dict:
        idx = np.asarray(idx)
        kinds = np.unique(self.ex.kind[idx])
        indexing = np.unique(self.ex.query[idx] < 0)
        if len(kinds) != 1 or len(indexing) != 1:
            raise ValueError("a batch must hold one query kind and one task (queries or indexing pairs)")
        batch: dict = {"query": torch.from_numpy(self.ex.query[idx]), "targets": torch.from_numpy(self.ex.targets[idx]),
                       "indexing": bool(indexing[0])}
        if kinds[0] == KIND_TEXT:
            batch["kind"] = TEXT
            batch["x"] = torch.from_numpy(self.text_vectors[self.ex.vec_row[idx]][:, None, :])
            batch["mask"] = torch.ones(len(idx), 1, dtype=torch.bool)
        else:
            lengths = self.ex.hist_len[idx]
            width = int(lengths.max())
            rows = self.ex.hist[idx, :width]
            batch["kind"] = HISTORY
            batch["x"] = torch.from_numpy(self.item_emb[np.maximum(rows, 0)])
            batch["mask"] = torch.from_numpy(rows >= 0)
            batch["hist_tokens"] = torch.from_numpy(self.item_tokens[rows])      # row -1 -> the PAD row
            batch["hist_items"] = torch.from_numpy(rows)
        sid_item = self.ex.sid[idx]
        if (sid_item >= 0).all():
            sid = self.item_sid[sid_item]
            batch["dec_in"] = torch.from_numpy(self.sid_inputs[sid])
            batch["target"] = torch.from_numpy(self.sid_targets[sid])
            batch["target_item"] = torch.from_numpy(sid_item)
        return batch


class BucketBatchSampler(Sampler):
    """Yields index arrays, one per batch, each within one bucket (kind x history length).

    With shuffle, buckets are shuffled inside and the batches are interleaved in a random order
    drawn from (seed, epoch): the same seed gives the same batches. With `replicas` > 1 (one
    rank of a multi-process run) every rank draws the same order and takes every replicas-th
    batch from position `rank`, the list padded from its start so every rank takes as many
    steps (DDP needs that); replicas 1 yields every batch, as before.
    """

    def __init__(self, keys: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 replicas: int = 1):
        self.keys, self.batch_size, self.shuffle, self.seed = keys, int(batch_size), shuffle, seed
        self.rank, self.replicas = int(rank), max(1, int(replicas))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        out = []
        for key in np.unique(self.keys):
            idx = np.flatnonzero(self.keys == key)
            if self.shuffle:
                idx = rng.permutation(idx)
            out.extend(np.array_split(idx, int(np.ceil(len(idx) / self.batch_size))))
        if self.shuffle:
            out = [out[i] for i in rng.permutation(len(out))]
        if self.replicas > 1 and out:
            out = (out * self.replicas)[: len(self) * self.replicas][self.rank::self.replicas]
        return out

    def __iter__(self):
        return iter(self._batches())

    def _all_batches(self) -> int:
        _, counts = np.unique(self.keys, return_counts=True)
        return int(np.ceil(counts / self.batch_size).sum())

    def __len__(self) -> int:
        return -(-self._all_batches() // self.replicas)

"""SARQ: path probability tables and the adaptive-depth stopping rule (vectorised, torch).

Path information of a prefix, by the chain rule:
    I_l(i) = sum_{j <= l} -log P(c_j | c_<j),
    P(c_j | c_<j) = (n(c_<=j) + a) / (n(c_<j) + a * K_j)
with n(.) the (optionally popularity-weighted) count of training items whose full-depth
code path starts with the prefix, `a` the additive smoothing and K_j the number of rows of
layer j when the table was estimated. A child the table never saw (an extension row added
later, or any child of an unseen prefix) gets the smoothed floor a / (n(parent) + a K_j),
so the table stays frozen: nothing a later stage does changes a probability it gives.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from components.runtime.errors import ConfigError

KEY_BITS_TOTAL = 62


def key_bits(n_layers: int) -> int:
    """Bits per layer when a prefix is packed into one int64 key."""
    return KEY_BITS_TOTAL // max(1, n_layers)


def prefix_keys(codes: Tensor, bits: int) -> list[Tensor]:
    """int64 key of every prefix: keys[l] identifies (c_1, ..., c_{l+1})."""
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ConfigError("tokenizer.codebook_sizes", f"at most {1 << bits} rows per layer fit the path table")
    keys, key = [], torch.zeros(codes.shape[0], dtype=torch.int64)
    for layer in range(codes.shape[1]):
        key = key * (1 << bits) + codes[:, layer].to(torch.int64)
        keys.append(key)
    return keys


class PathTable:
    """Counts of items under each code prefix, with additive smoothing at lookup time."""

    def __init__(self, sizes: list[int], keys: list[Tensor], counts: list[Tensor], total: float, smoothing: float):
        if smoothing <= 0:
            raise ConfigError("tokenizer.sarq.smoothing", "must be > 0 (an unseen prefix would have probability 0)")
        self.sizes = [int(k) for k in sizes]
        self.keys = keys
        self.counts = counts
        self.total = float(total)
        self.smoothing = float(smoothing)
        self.bits = key_bits(len(self.sizes))

    @classmethod
    def build(cls, codes: Tensor, sizes: list[int], smoothing: float, weights: Tensor | None = None) -> PathTable:
        """Estimate from full-depth codes (N, L); weights default to 1 per item."""
        codes = codes.to(torch.int64)
        w = torch.ones(codes.shape[0], dtype=torch.float64) if weights is None else weights.to(torch.float64)
        keys, counts = [], []
        for key in prefix_keys(codes, key_bits(len(sizes))):
            uniq, inv = torch.unique(key, sorted=True, return_inverse=True)
            keys.append(uniq)
            counts.append(torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, w))
        return cls(sizes, keys, counts, float(w.sum()), smoothing)

    def _lookup(self, layer: int, key: Tensor) -> Tensor:
        table_keys, table_counts = self.keys[layer], self.counts[layer]
        if table_keys.numel() == 0:
            return torch.zeros(key.shape, dtype=torch.float64)
        pos = torch.searchsorted(table_keys, key).clamp(max=table_keys.numel() - 1)
        found = table_keys[pos] == key
        return torch.where(found, table_counts[pos], torch.zeros((), dtype=torch.float64))

    def log_conditional(self, codes: Tensor) -> Tensor:
        """(N, l) log P(c_j | c_<j) for the first l <= L layers of `codes`."""
        a = self.smoothing
        keys = prefix_keys(codes.to(torch.int64), self.bits)
        parent = torch.full((codes.shape[0],), self.total, dtype=torch.float64)
        out = []
        for layer, key in enumerate(keys):
            child = self._lookup(layer, key)
            out.append(torch.log(child + a) - torch.log(parent + a * self.sizes[layer]))
            parent = child
        return torch.stack(out, 1) if out else torch.zeros(codes.shape[0], 0, dtype=torch.float64)

    def information(self, codes: Tensor) -> Tensor:
        """(N, l) path information I_j = -log P(c_1..c_j), in nats."""
        return -torch.cumsum(self.log_conditional(codes), dim=1)

    def state(self) -> dict:
        return {"sizes": list(self.sizes), "keys": [k.clone() for k in self.keys],
                "counts": [c.clone() for c in self.counts], "total": self.total, "smoothing": self.smoothing}

    @classmethod
    def from_state(cls, state: dict) -> PathTable:
        return cls(state["sizes"], state["keys"], state["counts"], state["total"], state["smoothing"])


def stop_depths(info: Tensor, tau: float, min_len: int, max_len: int) -> Tensor:
    """L(i): the first layer whose path information exceeds tau (the code chosen there is
    kept, then quantization stops), else max_len; clipped to [min_len, max_len]."""
    n_layers = info.shape[1]
    exceed = info > tau
    first = torch.where(exceed.any(1), exceed.to(torch.int64).argmax(1) + 1,
                        torch.full((info.shape[0],), n_layers, dtype=torch.int64))
    return first.clamp(min=min_len, max=max_len)


def unique_floor(codes: np.ndarray, lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Lengths after lengthening every shared SID one layer at a time until the SIDs are
    distinct or at max_len (`tokenizer.sarq.unique_head`).

    Path information decides how deep an item's SID goes; for head items that is often
    not deep enough to tell two of them apart, and a shared SID then spends top-K slots on
    items the query did not ask for. The group's own next-layer codes split it, so the
    SIDs stay semantic (no arbitrary collision numbers) and tail items keep their short SIDs."""
    lengths = np.asarray(lengths, dtype=np.int64).copy()
    cols = np.arange(codes.shape[1])[None, :]
    while True:
        keyed = np.where(cols < lengths[:, None], codes, -1)
        _, inv, counts = np.unique(np.column_stack([keyed, lengths]), axis=0, return_inverse=True,
                                   return_counts=True)
        grow = (counts[inv.reshape(-1)] > 1) & (lengths < max_len)
        if not grow.any():
            return lengths
        lengths[grow] += 1


def popularity_weights(popularity: Tensor) -> Tensor:
    """Popularity as table weights, scaled to mean 1 so the smoothing keeps its meaning
    (one pseudo-item per child); all-zero popularity falls back to uniform weights."""
    pop = popularity.to(torch.float64).clamp_min(0)
    mean = float(pop.mean()) if pop.numel() else 0.0
    return pop / mean if mean > 0 else torch.ones_like(pop)


def items_per_sid(codes: np.ndarray, lengths: np.ndarray) -> float:
    """Mean items per distinct SID (codes truncated to their lengths)."""
    cols = np.arange(codes.shape[1])[None, :]
    keyed = np.column_stack([np.where(cols < lengths[:, None], codes, -1), lengths])
    return len(codes) / max(1, len(np.unique(keyed, axis=0)))


def choose_tau(info: Tensor, codes: Tensor, target: float, min_len: int, max_len: int,
               candidates: int = 256) -> float:
    """The smallest tau whose SIDs hold at most `target` items on average (`tau: auto`).

    A fixed tau means different things on different catalogs and layer counts (3 layers
    leave a window under one nat wide between lengths 2 and 3); a target items-per-SID
    carries over. Lengths change only where tau crosses an item's path information, so the
    candidates are quantiles of those values; more candidates, a finer choice. Where no
    candidate reaches the target (every item at max_len), the deepest tau is returned."""
    values = np.unique(info[:, :max_len].numpy())
    if len(values) > candidates:
        values = np.unique(np.quantile(values, np.linspace(0, 1, candidates)))
    codes_np = codes.numpy()
    for tau in values.tolist():
        if items_per_sid(codes_np, stop_depths(info, tau, min_len, max_len).numpy()) <= target:
            return float(tau)
    return float(values[-1]) if len(values) else math.inf


def parse_tau(value: object) -> float:
    """tau from params: a number, or null / 'inf' for 'never stop early' (fixed length);
    'auto' is read by the tokenizer config and never reaches here."""
    if value is None:
        return math.inf
    try:
        tau = float(value)
    except (TypeError, ValueError):
        raise ConfigError("tokenizer.sarq.tau", f"must be a number or .inf, got {value!r}") from None
    if math.isnan(tau):
        raise ConfigError("tokenizer.sarq.tau", "must not be NaN")
    return tau

"""Vectorised beam search over SID codes, optionally constrained by a prefix trie.

The trie is a list of dense per-depth transition tables built once with numpy:
`tables[t][node, j]` is the depth-(t+1) node reached from depth-t node `node` by code j of
layer t, or -1; the last column is END and holds the index of the SID that ends at `node`
(or -1). Each table has an extra all -1 "sink" row for dead beams. At every step the masks
of all (query x beam) pairs are one gather; there is no Python loop over beams or queries.
Finished beams stay in the beam carrying their score, so the final beam holds the best
complete SIDs, sorted by log-probability and distinct (distinct prefixes stay distinct).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from components.tokenizers.sid_vocab import SidCatalog, SidVocab

NEG_INF = float("-inf")


@dataclass
class SidTrie:
    """Prefix trie of issued SIDs as per-depth transition tables (torch int32: half the gather traffic)."""

    tables: list[torch.Tensor]   # tables[t]: (n_nodes_t + 1, K_t + 1) int32; last row = sink, last column = END
    _copies: dict = field(default_factory=dict, repr=False, compare=False)  # device -> SidTrie (`on`)

    @classmethod
    def build(cls, codes: np.ndarray, lengths: np.ndarray, codebook_sizes: tuple[int, ...]) -> SidTrie:
        """codes (S, max_len) -1 padded, distinct SIDs; END at depth t points to the SID's index."""
        max_len = len(codebook_sizes)
        if codes.shape[1] != max_len:
            raise ValueError(f"codes have {codes.shape[1]} columns, codebook_sizes {max_len} layers")
        n = len(codes)
        # node id of each SID's prefix of length t (t = 0..max_len), -1 where the SID is shorter
        node_of = np.full((n, max_len + 1), -1, dtype=np.int64)
        node_of[:, 0] = 0
        n_nodes = [1]
        key = np.zeros(n, dtype=np.int64)
        for t in range(max_len):
            has = lengths > t
            key = key * (codebook_sizes[t] + 1) + np.where(has, codes[:, t], 0)
            uniq, inv = np.unique(key[has], return_inverse=True)
            node_of[has, t + 1] = inv.reshape(-1)
            n_nodes.append(len(uniq))
        tables = []
        for t in range(max_len + 1):
            width = codebook_sizes[t] + 1 if t < max_len else 1
            table = np.full((n_nodes[t] + 1, width), -1, dtype=np.int32)
            if t < max_len:
                has = lengths > t
                table[node_of[has, t], codes[has, t]] = node_of[has, t + 1]
            ends = lengths == t
            table[node_of[ends, t], width - 1] = np.flatnonzero(ends)
            tables.append(torch.from_numpy(table))
        return cls(tables)

    @classmethod
    def from_catalog(cls, catalog: SidCatalog, codebook_sizes: tuple[int, ...]) -> SidTrie:
        return cls.build(catalog.codes, catalog.lengths, codebook_sizes)

    @property
    def max_len(self) -> int:
        return len(self.tables) - 1

    def on(self, device: torch.device) -> SidTrie:
        """The tables on `device` (copied once per device and kept): the trie follows the model."""
        if self.tables[0].device == device:
            return self
        if device not in self._copies:
            self._copies[device] = SidTrie([t.to(device) for t in self.tables])
        return self._copies[device]


class StepDecoder(Protocol):
    """What beam search needs from a model: one decoder step over all live beams."""

    def start(self, batch: dict) -> object:
        """Encode the queries; return an opaque decoding state for N queries x 1 beam."""

    def step(self, state: object, tokens: torch.Tensor, depth: int, columns: torch.Tensor) -> torch.Tensor:
        """Feed `tokens` (N, W) at position `depth`; return log-probs (N, W, len(columns))."""

    def reorder(self, state: object, index: torch.Tensor) -> object:
        """Keep beams `index` (N, W') of each query, in that order."""


@dataclass
class BeamResult:
    """Top beams per query, best first; rows with score -inf are empty slots."""

    codes: torch.Tensor    # (N, B, max_len) int64, -1 padded
    lengths: torch.Tensor  # (N, B)
    scores: torch.Tensor   # (N, B) summed log-probabilities
    sid_index: torch.Tensor  # (N, B) index into the catalog's SIDs, -1 if not issued / unconstrained

    def to_lists(self) -> tuple[list[list[tuple[int, ...]]], list[list[float]]]:
        """Drop empty slots; return SIDs as code tuples and their scores, per query."""
        codes, lengths, scores = self.codes.tolist(), self.lengths.tolist(), self.scores.tolist()
        sids, out_scores = [], []
        for c_q, l_q, s_q in zip(codes, lengths, scores):
            keep = [b for b, s in enumerate(s_q) if s != NEG_INF]
            sids.append([tuple(c_q[b][: l_q[b]]) for b in keep])
            out_scores.append([s_q[b] for b in keep])
        return sids, out_scores


@torch.inference_mode()
def beam_search(model: StepDecoder, batch: dict, vocab: SidVocab, beam: int, trie: SidTrie | None) -> BeamResult:
    """Width-`beam` search for all queries of `batch` at once; constrained when `trie` is given.

    Unconstrained mode only keeps each step to its layer's codes (END from depth 1 on), so a
    hallucinated SID is a well-formed code sequence that no item holds.
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    state = model.start(batch)
    max_len = vocab.max_len
    if trie is not None and trie.max_len != max_len:
        raise ValueError(f"trie depth {trie.max_len} != vocabulary depth {max_len}")
    n = _batch_size(batch)
    device = batch["x"].device  # search state lives where the model's inputs are
    trie = trie.on(device) if trie is not None else None
    scores = torch.zeros(n, 1, device=device)
    node = torch.zeros(n, 1, dtype=torch.int32, device=device)
    done = torch.zeros(n, 1, dtype=torch.bool, device=device)
    sid_index = torch.full((n, 1), -1, dtype=torch.long, device=device)
    codes = torch.full((n, 1, max_len), -1, dtype=torch.long, device=device)
    lengths = torch.zeros(n, 1, dtype=torch.long, device=device)
    tokens = torch.full((n, 1), 1, dtype=torch.long, device=device)  # BOS
    offsets = vocab.offsets
    for depth in range(max_len):
        if bool(done.all()):
            break
        columns = torch.from_numpy(vocab.layer_columns(depth)).to(device)
        width = len(columns)
        logp = model.step(state, tokens, depth, columns)  # (N, W, K+1)
        child = None
        if trie is not None:
            child = trie.tables[depth][node]               # (N, W, K+1)
            logp.masked_fill_(child < 0, NEG_INF)
        elif depth == 0:
            logp[..., -1] = NEG_INF                        # no empty SID
        cand = logp.add_(scores.unsqueeze(-1))
        cand[..., :-1].masked_fill_(done.unsqueeze(-1), NEG_INF)
        cand[..., -1] = torch.where(done, scores, cand[..., -1])
        w = scores.shape[1]
        k = min(beam, w * width)
        top, flat = cand.reshape(n, w * width).topk(k, dim=1)
        src = torch.div(flat, width, rounding_mode="floor")
        col = flat - src * width
        was_done = done.gather(1, src)
        ends = col == width - 1
        alive = top > NEG_INF
        new_sid = sid_index.gather(1, src)
        if child is not None:
            reached = child.reshape(n, w * width).gather(1, flat)
            new_sid = torch.where(ends & ~was_done, reached, new_sid)
            next_node = torch.where(ends | ~alive, trie.tables[depth + 1].shape[0] - 1, reached)
        else:
            next_node = torch.zeros_like(src)
        codes = codes.gather(1, src.unsqueeze(-1).expand(-1, -1, max_len))
        lengths = lengths.gather(1, src)
        grow = ~ends & alive
        codes[:, :, depth] = torch.where(grow, col, codes[:, :, depth])
        lengths = lengths + grow.long()
        done = ends | ~alive
        scores, node, sid_index = top, next_node, new_sid
        tokens = torch.where(grow, col + offsets[depth], 1)
        if depth + 1 < max_len:
            state = model.reorder(state, src)
    else:
        # every beam still alive at full depth ends here: at max_len only END can follow
        live = ~done & (scores > NEG_INF)
        if trie is not None:
            reached = trie.tables[max_len][node, 0]
            sid_index = torch.where(live, reached, sid_index)
            scores = torch.where(live & (reached < 0), NEG_INF, scores)
    if scores.shape[1] < beam:
        pad = beam - scores.shape[1]
        scores = torch.cat([scores, torch.full((n, pad), NEG_INF, device=device)], 1)
        sid_index = torch.cat([sid_index, torch.full((n, pad), -1, dtype=torch.long, device=device)], 1)
        lengths = torch.cat([lengths, torch.zeros(n, pad, dtype=torch.long, device=device)], 1)
        codes = torch.cat([codes, torch.full((n, pad, max_len), -1, dtype=torch.long, device=device)], 1)
    order = scores.argsort(dim=1, descending=True, stable=True)
    return BeamResult(codes.gather(1, order.unsqueeze(-1).expand(-1, -1, max_len)), lengths.gather(1, order),
                      scores.gather(1, order), sid_index.gather(1, order))


def _batch_size(batch: dict) -> int:
    return int(batch["x"].shape[0])

"""Turn a query into the memory vectors the seq2seq backbone attends to.

Text query: its frozen MiniLM embedding (embeddings/queries.npy) through a trainable
projection into `n_memory` vectors. History query: the user's item embeddings
(embeddings/items.npy), oldest first, each projected to d_model, plus a learned position
counted back from the most recent item (so "last item" means the same slot at every
history length), plus, with `n_item_ids` > 0, a learned embedding of the item's row (the
collaborative signal SASRec lives on; rows beyond the table, i.e. items added after training,
share one untrained zero row, so new items fall back on their text). The backbone's Transformer encoder runs over either memory.
"""
from __future__ import annotations

import torch
from torch import nn

TEXT, HISTORY = "text", "history"


class TextQueryEncoder(nn.Module):
    """One frozen sentence embedding -> n_memory trainable memory vectors."""

    def __init__(self, emb_dim: int, d_model: int, n_memory: int, dropout: float):
        super().__init__()
        self.n_memory, self.d_model = n_memory, d_model
        self.proj = nn.Linear(emb_dim, n_memory * d_model)
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 1, emb_dim) -> (N, n_memory, d_model)."""
        out = self.proj(x[:, 0]).view(x.shape[0], self.n_memory, self.d_model)
        return self.drop(self.norm(out))


def item_id_table(n_item_ids: int, d_model: int) -> nn.Embedding | None:
    """Learned item-id rows plus one zero padding row (row n_item_ids) that items added after
    training share; None when n_item_ids is 0."""
    if not n_item_ids:
        return None
    table = nn.Embedding(n_item_ids + 1, d_model, padding_idx=n_item_ids)
    nn.init.normal_(table.weight, std=0.02)
    with torch.no_grad():
        table.weight[n_item_ids].zero_()
    return table


class HistoryQueryEncoder(nn.Module):
    """A sequence of item embeddings -> projected vectors with recency positions."""

    def __init__(self, emb_dim: int, d_model: int, max_history: int, dropout: float, n_item_ids: int = 0):
        super().__init__()
        self.max_history, self.n_item_ids = max_history, n_item_ids
        self.proj = nn.Linear(emb_dim, d_model)
        self.ids = item_id_table(n_item_ids, d_model)
        self.pos = nn.Embedding(max_history, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, L, emb_dim) left-aligned, mask (N, L) True = item; position 0 = most recent;
        rows (N, L) item rows (-1 = padding), needed when item-id embeddings are on."""
        lengths = mask.sum(1, keepdim=True)
        recency = (lengths - 1 - torch.arange(x.shape[1], device=x.device)[None, :]).clamp(0, self.max_history - 1)
        h = self.proj(x) + self.pos(recency)
        if self.ids is not None:
            if rows is None:
                raise ValueError("item-id embeddings are on: the batch needs 'hist_items' (item rows)")
            unknown = (rows < 0) | (rows >= self.n_item_ids)
            h = h + self.ids(rows.masked_fill(unknown, self.n_item_ids))
        return self.drop(self.norm(h))


class QueryEncoder(nn.Module):
    """Dispatch a batch to the text or the history encoder; return (memory, mask).

    Indexing pairs (an item standing in for a query that asks for itself) get a learned
    marker added to their memory: a one-item history then means "this item" in an indexing
    pair and "what comes after this item" in a real query, and the two tasks do not clash.
    """

    def __init__(self, emb_dim: int, d_model: int, n_memory: int, max_history: int, dropout: float,
                 n_item_ids: int = 0):
        super().__init__()
        self.text = TextQueryEncoder(emb_dim, d_model, n_memory, dropout)
        self.history = HistoryQueryEncoder(emb_dim, d_model, max_history, dropout, n_item_ids)
        self.index_marker = nn.Parameter(torch.zeros(d_model))

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """batch: kind ('text' | 'history'), x (N, L, emb_dim), mask (N, L) bool, optional indexing (bool)."""
        kind = batch["kind"]
        if kind == TEXT:
            memory = self.text(batch["x"])
            mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        elif kind == HISTORY:
            memory, mask = self.history(batch["x"], batch["mask"], batch.get("hist_items")), batch["mask"]
        else:
            raise ValueError(f"unknown query kind {kind!r}")
        if batch.get("indexing", False):
            memory = memory + self.index_marker
        return memory, mask

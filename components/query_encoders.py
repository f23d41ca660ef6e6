"""Turn a query into the memory vectors the seq2seq backbone attends to.

Text query: its frozen MiniLM embedding (embeddings/queries.npy) through a trainable
projection into `n_memory` vectors. History query: the user's item embeddings
(embeddings/items.npy), oldest first, each projected to d_model, plus a learned position
counted back from the most recent item (so "last item" means the same slot at every
history length). The backbone's Transformer encoder runs over either memory.
"""
from __future__ import annotations

import torch
from torch import nn

from components.errors import ConfigError

TEXT, HISTORY = "text", "history"


def check_text_encoder_option(retriever_params: dict) -> None:
    """Fine-tuning MiniLM is refused: see the ConfigError message for why."""
    if retriever_params.get("finetune_text_encoder", False):
        raise ConfigError(
            "retriever.finetune_text_encoder",
            "fine-tuning the MiniLM text encoder is not supported: it would re-encode every query and "
            "every item text (indexing pairs) with gradients each epoch, about 100x the cost of the "
            "frozen-embedding projection on a CPU. Keep it false; the trainable projection over the "
            "frozen embedding is what this project trains.",
        )


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


class HistoryQueryEncoder(nn.Module):
    """A sequence of item embeddings -> projected vectors with recency positions."""

    def __init__(self, emb_dim: int, d_model: int, max_history: int, dropout: float):
        super().__init__()
        self.max_history = max_history
        self.proj = nn.Linear(emb_dim, d_model)
        self.pos = nn.Embedding(max_history, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (N, L, emb_dim) left-aligned, mask (N, L) True = item; position 0 = most recent."""
        lengths = mask.sum(1, keepdim=True)
        recency = (lengths - 1 - torch.arange(x.shape[1], device=x.device)[None, :]).clamp(0, self.max_history - 1)
        return self.drop(self.norm(self.proj(x) + self.pos(recency)))


class QueryEncoder(nn.Module):
    """Dispatch a batch to the text or the history encoder; return (memory, mask).

    Indexing pairs (an item standing in for a query that asks for itself) get a learned
    marker added to their memory: a one-item history then means "this item" in an indexing
    pair and "what comes after this item" in a real query, and the two tasks do not clash.
    """

    def __init__(self, emb_dim: int, d_model: int, n_memory: int, max_history: int, dropout: float):
        super().__init__()
        self.text = TextQueryEncoder(emb_dim, d_model, n_memory, dropout)
        self.history = HistoryQueryEncoder(emb_dim, d_model, max_history, dropout)
        self.index_marker = nn.Parameter(torch.zeros(d_model))

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """batch: kind ('text' | 'history'), x (N, L, emb_dim), mask (N, L) bool, optional indexing (bool)."""
        kind = batch["kind"]
        if kind == TEXT:
            memory = self.text(batch["x"])
            mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        elif kind == HISTORY:
            memory, mask = self.history(batch["x"], batch["mask"]), batch["mask"]
        else:
            raise ValueError(f"unknown query kind {kind!r}")
        if batch.get("indexing", False):
            memory = memory + self.index_marker
        return memory, mask

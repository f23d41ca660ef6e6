"""The retriever's learned item scorer: the query state against every item's vector.

Why: items that share a decoded SID (short tail SIDs hold several) were ordered by popularity,
which puts tail and cold items last inside their own SID, and an item the decoder never learned
could not surface at all. The scorer gives every item a vector (its frozen text embedding
projected, plus a learned item-id row when the retriever has item ids; rows beyond the table,
i.e. items added after training, fall back on their text) and the query a vector pooled from
the retriever's encoder output. It trains beside the SID loss with a softmax over the whole
catalog (a few thousand rows here: cheaper than sampling negatives and without their bias), and
ranks items inside a SID (`components.retrieval.retrieve`) and the dense side of the fusion
(`components.retrieval.fusion`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.retrieval.query_encoders import item_id_table

TEMPERATURE = 0.05  # cosine scores / temperature: the two-tower baseline's setting


class ItemScorer(nn.Module):
    """Cosine between a pooled query state and item vectors, divided by TEMPERATURE."""

    def __init__(self, emb_dim: int, d_model: int, n_item_ids: int = 0):
        super().__init__()
        self.n_item_ids = n_item_ids
        self.query = nn.Linear(d_model, d_model)
        self.item_text = nn.Linear(emb_dim, d_model)
        self.item_ids = item_id_table(n_item_ids, d_model)

    def query_vectors(self, enc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """enc (N, M, d) encoder output, mask (N, M) True = real -> (N, d) unit vectors."""
        w = mask.unsqueeze(-1).to(enc.dtype)
        pooled = (enc * w).sum(1) / w.sum(1).clamp_min(1.0)
        return F.normalize(self.query(pooled), dim=-1)

    def item_vectors(self, item_emb: torch.Tensor, text_only: torch.Tensor | None = None) -> torch.Tensor:
        """item_emb (I, emb_dim) frozen text embeddings in catalog row order -> (I, d) unit vectors.

        `text_only` (I,) bool: items that take the zero id row, as items added after training do.
        Why: an item without training interactions is never a target, so its own id row only ever
        learns to score low (a negative of every softmax) and ranks it below its text's merit."""
        vec = self.item_text(item_emb)
        if self.item_ids is not None:
            rows = torch.arange(len(item_emb), device=item_emb.device).clamp_max(self.n_item_ids)
            if text_only is not None:
                rows = rows.masked_fill(text_only[: len(rows)], self.n_item_ids)
            vec = vec + self.item_ids(rows)
        return F.normalize(vec, dim=-1)

    def logits(self, query_vec: torch.Tensor, item_vec: torch.Tensor) -> torch.Tensor:
        return query_vec @ item_vec.T / TEMPERATURE

"""The retriever's learned item scorer: the query state against every item's vector.

Why: items that share a decoded SID (short tail SIDs hold several) were ordered by popularity,
which puts tail and cold items last inside their own SID, and an item the decoder never learned
could not surface at all. The scorer gives every item a vector (its frozen text embedding
projected, plus a learned item-id row when the retriever has item ids; rows beyond the table,
i.e. items added after training, fall back on their text) and the query a vector pooled from
the retriever's encoder output. It trains beside the SID loss with a softmax over the whole
catalog up to FULL_SOFTMAX_UP_TO items (cheaper there than sampling negatives, and without their
bias), and above it with a sampled softmax (`sampled_candidates`): the batch's own targets plus
uniform negatives, each logit corrected by the log of its expected count (log-Q), so a million-item
catalog costs a few thousand item vectors a step, not a million. It ranks items inside a SID
(`components.retrieval.retrieve`) and the dense side of the fusion (`components.retrieval.fusion`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.retrieval.query_encoders import item_id_table

TEMPERATURE = 0.05  # cosine scores / temperature: the two-tower baseline's setting
FULL_SOFTMAX_UP_TO = 32_768  # `auto`: a softmax over every item up to this catalog size, sampled above it
SAMPLED_NEGATIVES = 8_192    # `auto` above that size: uniform negatives per step (beside the batch's targets)


def negatives_for(setting: int | str | None, n_items: int) -> int:
    """Uniform negatives per training step of the item scorer; 0 = a softmax over the whole catalog.
    setting: retriever.item_head_negatives (`auto`/None: full up to FULL_SOFTMAX_UP_TO items, else
    SAMPLED_NEGATIVES; `full`; or a count, used as asked below the catalog size)."""
    if setting in (None, "auto"):
        return 0 if n_items <= FULL_SOFTMAX_UP_TO else SAMPLED_NEGATIVES
    if setting == "full":
        return 0
    return int(setting) if int(setting) < n_items else 0


def sampled_candidates(targets: torch.Tensor, target_share: torch.Tensor, n_negatives: int,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The item rows a sampled-softmax step scores, each query's label among them, and each row's log-Q.

    Candidates are the batch's distinct targets (in-batch negatives for the other queries: drawn in
    proportion to how often items are targets, `target_share`, summing to 1) and `n_negatives` uniform
    draws over the catalog. Why log-Q: under that mixed proposal item i is expected B x share_i +
    S / N times in a step; subtracting its log from i's logit makes the sampled softmax an unbiased
    stand-in for the full one (Yi et al. 2019, sampling-bias-corrected retrieval), where popular items,
    which are in-batch negatives most often, would otherwise be pushed down for being popular."""
    n_items = len(target_share)
    uniform = torch.randint(0, n_items, (n_negatives,), generator=generator, device=targets.device)
    rows, inverse = torch.unique(torch.cat([targets, uniform]), return_inverse=True)
    expected = len(targets) * target_share.to(targets.device)[rows] + n_negatives / n_items
    return rows, inverse[: len(targets)], expected.log()


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

    def item_vectors(self, item_emb: torch.Tensor, text_only: torch.Tensor | None = None,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
        """item_emb (I, emb_dim) frozen text embeddings in catalog row order -> (I, d) unit vectors
        (`rows`: only those catalog rows, in that order, for a sampled softmax).

        `text_only` (I,) bool: items that take the zero id row, as items added after training do.
        Why: an item without training interactions is never a target, so its own id row only ever
        learns to score low (a negative of every softmax) and ranks it below its text's merit."""
        if rows is None:
            rows = torch.arange(len(item_emb), device=item_emb.device)
        else:
            item_emb = item_emb[rows]
        vec = self.item_text(item_emb)
        if self.item_ids is not None:
            ids = rows.clamp_max(self.n_item_ids)
            if text_only is not None:
                ids = ids.masked_fill(text_only[rows], self.n_item_ids)
            vec = vec + self.item_ids(ids)
        return F.normalize(vec, dim=-1)

    def logits(self, query_vec: torch.Tensor, item_vec: torch.Tensor) -> torch.Tensor:
        return query_vec @ item_vec.T / TEMPERATURE

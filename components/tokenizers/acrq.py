"""ACRQ: the Stage-2 hybrid codebooks [A_l ; E_l] (its curriculum K_1 <= ... <= K_L is checked with params:
components/runtime/config_schema.py check_across).

Stage 2 freezes the Stage-1 encoder and decoder as well as the anchors: the latent space
the anchors were learned in stays the same, so head SIDs stay valid and a new item is
encoded exactly like the items already issued. Only the extension rows train; `rqvae.fit`
starts them from k-means on the tail items' residuals (its k-means init touches only
trainable rows) and its dead-code re-seeding moves only extension rows.
"""
from __future__ import annotations

from components.tokenizers.rqvae import RQVAE


def anchored_model(head: RQVAE, ext_sizes: list[int]) -> RQVAE:
    """A copy of the head model whose rows are all frozen anchors, with empty extensions,
    and whose encoder and decoder no longer train."""
    model = RQVAE.from_state(head.state())
    model.quantizer = model.quantizer.frozen_as_anchors(ext_sizes)
    for module in (model.encoder, model.decoder):
        for p in module.parameters():
            p.requires_grad_(False)
    return model


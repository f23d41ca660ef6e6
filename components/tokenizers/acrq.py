"""ACRQ: the head curriculum check and the Stage-2 hybrid codebooks [A_l ; E_l].

Stage 2 freezes the Stage-1 encoder and decoder as well as the anchors: the latent space
the anchors were learned in stays the same, so head SIDs stay valid and a new item is
encoded exactly like the items already issued. Only the extension rows train; `rqvae.fit`
starts them from k-means on the tail items' residuals (its k-means init touches only
trainable rows) and its dead-code re-seeding moves only extension rows.
"""
from __future__ import annotations

from components.runtime.errors import ConfigError
from components.tokenizers.rqvae import RQVAE


def check_curriculum(sizes: list[int]) -> None:
    """K_1 <= K_2 <= ... <= K_L (small early codebooks hold coarse semantics)."""
    if any(not isinstance(k, int) or k < 1 for k in sizes):
        raise ConfigError("tokenizer.codebook_sizes", f"must be positive integers, got {sizes}")
    for layer in range(1, len(sizes)):
        if sizes[layer] < sizes[layer - 1]:
            raise ConfigError("tokenizer.codebook_sizes",
                              f"ACRQ needs non-decreasing sizes; layer {layer + 1} ({sizes[layer]}) < "
                              f"layer {layer} ({sizes[layer - 1]}) in {sizes}")


def check_extensions(ext_sizes: list[int], n_layers: int) -> None:
    if len(ext_sizes) != n_layers or any(not isinstance(k, int) or k < 0 for k in ext_sizes):
        raise ConfigError("tokenizer.extension_sizes",
                          f"needs {n_layers} non-negative integers (one per layer), got {ext_sizes}")


def anchored_model(head: RQVAE, ext_sizes: list[int]) -> RQVAE:
    """A copy of the head model whose rows are all frozen anchors, with empty extensions,
    and whose encoder and decoder no longer train."""
    model = RQVAE.from_state(head.state())
    model.quantizer = model.quantizer.frozen_as_anchors(ext_sizes)
    for module in (model.encoder, model.decoder):
        for p in module.parameters():
            p.requires_grad_(False)
    return model


"""Encoder-decoder backbones over query memory vectors and SID tokens.

`SmallSeq2Seq`: our own pre-LN Transformer, small enough for CPUs, with a key/value cache
for decoding (each step feeds only the new token; beams of a query share one cross-attention
memory, so it is never copied per beam). `HFSeq2Seq`: a Hugging Face encoder-decoder
(T5 built from a T5Config with random weights, or a local pretrained checkpoint) fed
`inputs_embeds`, decoding with the model's own key/value cache (reordered with the beams).
Both expose: forward (teacher forcing) -> logits, start / step / reorder for beam search.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.h, self.dh = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(..., T, d) -> (..., H, T, dh)."""
        return x.unflatten(-1, (self.h, self.dh)).transpose(-3, -2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(x).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
               causal: bool = False) -> torch.Tensor:
        q = self.split(self.q(x))
        p = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return self.out(o.transpose(-3, -2).flatten(-2))


class _DecoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.self_attn = _Attention(d_model, n_heads, dropout)
        self.cross_attn = _Attention(d_model, n_heads, dropout)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_dim, d_model))
        self.n1, self.n2, self.n3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, y: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor, cross_mask: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: y (N, T, d); causal self-attention over the whole prefix."""
        h = self.n1(y)
        k, v = self.self_attn.keys_values(h)
        y = y + self.drop(self.self_attn.attend(h, k, v, causal=True))
        y = y + self.drop(self.cross_attn.attend(self.n2(y), cross_k, cross_v, cross_mask))
        return y + self.drop(self.ff(self.n3(y)))

    def step(self, y: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None,
             cross: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Decoding: y (N, W, d), one new token per beam; cache (N, W, t, d) keys / values.

        Self-attention over at most max_len cached positions is elementwise work (no batched
        matmul over N*W*H tiny matrices). Cross-attention uses block-diagonal per-head keys and
        values (see `cross_blocks`): two plain batched matmuls per query, no transposes.
        """
        att, h_, dh = self.self_attn, self.self_attn.h, self.self_attn.dh
        n, w, d = y.shape
        h = self.n1(y)
        q = att.q(h).view(n, w, 1, h_, dh)
        k, v = att.kv(h).unsqueeze(2).chunk(2, dim=-1)                   # (N, W, 1, d) each
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        t = k.shape[2]
        a = (q * k.view(n, w, t, h_, dh)).sum(-1).mul_(dh ** -0.5).softmax(2)      # (N, W, t, H)
        y = y + att.out((a.unsqueeze(-1) * v.view(n, w, t, h_, dh)).sum(2).view(n, w, d))
        k_blk, v_blk, bias = cross
        ca = self.cross_attn
        scores = torch.bmm(ca.q(self.n2(y)), k_blk).view(n, w, h_, -1).add_(bias).softmax(-1)
        y = y + ca.out(torch.bmm(scores.view(n, w, -1), v_blk))
        return y + self.ff(self.n3(y)), (k, v)

    def cross_blocks(self, enc: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-query cross-attention operands: keys (N, d, H*M) and values (N, H*M, d), block-diagonal
        by head and pre-scaled, plus the additive memory mask (N, 1, 1, M). Made once per batch."""
        ca = self.cross_attn
        n, m, d = enc.shape
        k, v = ca.kv(enc).chunk(2, dim=-1)                                 # (N, M, d)
        eye = torch.eye(ca.h, dtype=enc.dtype, device=enc.device)
        # block (head g, head g'): k_g^T if g == g' else 0
        k_blk = (k.view(n, m, ca.h, 1, ca.dh) * eye.view(1, 1, ca.h, ca.h, 1)) * ca.dh ** -0.5
        k_blk = k_blk.permute(0, 3, 4, 2, 1).reshape(n, d, ca.h * m)      # rows (g, dh), cols (g', m)
        v_blk = (v.view(n, m, ca.h, 1, ca.dh) * eye.view(1, 1, ca.h, ca.h, 1)).permute(0, 2, 1, 3, 4)
        v_blk = v_blk.reshape(n, ca.h * m, d)                              # rows (g, m), cols (g', dh)
        bias = torch.zeros(mask.shape, dtype=enc.dtype, device=enc.device).masked_fill_(~mask, float("-inf"))
        return k_blk.contiguous(), v_blk.contiguous(), bias[:, None, None, :]


class SmallSeq2Seq(nn.Module):
    """Pre-LN Transformer encoder-decoder with a KV-cached decoding step."""

    def __init__(self, vocab_size: int, max_len: int, d_model: int, n_heads: int, n_layers: int, ff_dim: int,
                 dropout: float, decoder_layers: int | None = None):
        super().__init__()
        self.d_model = d_model
        layer = nn.TransformerEncoderLayer(d_model, n_heads, ff_dim, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        n_dec = n_layers if decoder_layers is None else decoder_layers
        self.layers = nn.ModuleList(_DecoderLayer(d_model, n_heads, ff_dim, dropout) for _ in range(n_dec))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        nn.init.normal_(self.tok.weight, std=1.0 / math.sqrt(d_model))

    def encode(self, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(memory, src_key_padding_mask=~mask)

    def _cross(self, enc: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.cross_attn.keys_values(enc) for layer in self.layers]

    def forward(self, memory: torch.Tensor, mask: torch.Tensor, dec_in: torch.Tensor,
                enc: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits (N, T, V) for decoder inputs dec_in (N, T); `enc` = encode(memory, mask) if known."""
        enc = self.encode(memory, mask) if enc is None else enc
        cross_mask = mask[:, None, None, :]
        y = self.tok(dec_in) + self.pos.weight[: dec_in.shape[1]]
        for layer, (k, v) in zip(self.layers, self._cross(enc)):
            y = layer(y, k, v, cross_mask)
        return self.head(self.norm(y))

    def start(self, memory: torch.Tensor, mask: torch.Tensor) -> dict:
        enc = self.encode(memory, mask)
        return {"cross": [layer.cross_blocks(enc, mask) for layer in self.layers], "cache": [None] * len(self.layers)}

    def step(self, state: dict, tokens: torch.Tensor, depth: int, columns: torch.Tensor) -> torch.Tensor:
        """tokens (N, W) at position `depth` -> logits (N, W, len(columns)); extends the cache."""
        y = self.tok(tokens) + self.pos.weight[depth]
        for i, (layer, cross) in enumerate(zip(self.layers, state["cross"])):
            y, state["cache"][i] = layer.step(y, state["cache"][i], cross)
        return F.linear(self.norm(y), self.head.weight[columns], self.head.bias[columns])

    def reorder(self, state: dict, index: torch.Tensor) -> dict:
        n, w_old = state["cache"][0][0].shape[:2]
        flat = (torch.arange(n, device=index.device)[:, None] * w_old + index).reshape(-1)
        state["cache"] = [tuple(t.flatten(0, 1).index_select(0, flat).unflatten(0, index.shape) for t in kv)
                          for kv in state["cache"]]
        return state


class _Columns(nn.Module):
    """An output layer restricted to some vocabulary columns, for one decoding step."""

    def __init__(self, head: nn.Linear, columns: torch.Tensor):
        super().__init__()
        self.weight = head.weight[columns]
        self.bias = None if head.bias is None else head.bias[columns]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class HFSeq2Seq(nn.Module):
    """A Hugging Face encoder-decoder (T5, BART, ...) driven by inputs_embeds and SID token ids."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.d_model = int(model.config.d_model)

    def encode(self, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.get_encoder()(inputs_embeds=memory, attention_mask=mask.long()).last_hidden_state

    def forward(self, memory: torch.Tensor, mask: torch.Tensor, dec_in: torch.Tensor,
                enc: torch.Tensor | None = None) -> torch.Tensor:
        if enc is None:
            return self.model(inputs_embeds=memory, attention_mask=mask.long(), decoder_input_ids=dec_in,
                              use_cache=False).logits
        return self.model(encoder_outputs=(enc,), attention_mask=mask.long(), decoder_input_ids=dec_in,
                          use_cache=False).logits

    def start(self, memory: torch.Tensor, mask: torch.Tensor) -> dict:
        """Rows of `enc` / `mask` / the cache follow the live beams (N x W, flattened)."""
        return {"enc": self.encode(memory, mask), "mask": mask.long(), "cache": None}

    def step(self, state: dict, tokens: torch.Tensor, depth: int, columns: torch.Tensor) -> torch.Tensor:
        """Feed only the new token per beam; the model's key/value cache holds the prefix.
        The output layer scores only the depth's columns where logits are exactly the output
        layer's (T5; not BART, which adds a bias after it): a third of T5's step cost at B=100."""
        n, w = tokens.shape
        narrow = not hasattr(self.model, "final_logits_bias")
        head = self.model.get_output_embeddings()
        if narrow:
            self.model.set_output_embeddings(_Columns(head, columns))
        try:
            out = self.model(encoder_outputs=(state["enc"],), attention_mask=state["mask"],
                             decoder_input_ids=tokens.reshape(n * w, 1), cache=state["cache"], use_cache=True)
        finally:
            self.model.set_output_embeddings(head)
        state["cache"] = out.cache
        logits = out.logits[:, -1] if narrow else out.logits[:, -1, columns]
        return logits.reshape(n, w, len(columns))

    def reorder(self, state: dict, index: torch.Tensor) -> dict:
        n, w_new = index.shape
        w_old = state["enc"].shape[0] // n
        flat = (torch.arange(n, device=index.device)[:, None] * w_old + index).reshape(-1)
        state["cache"].self_attention_cache.reorder_cache(flat)
        if w_new != w_old:  # beams of a query share its cross-attention keys and encoder rows: copy only to widen
            state["cache"].cross_attention_cache.reorder_cache(flat)
            state["enc"], state["mask"] = state["enc"].index_select(0, flat), state["mask"].index_select(0, flat)
        return state

"""Residual quantizer core shared by every tokenizer: codebooks, assignment, losses, k-means.

Each layer's codebook is `[anchors ; extension]`: anchor rows are a frozen buffer (ACRQ
Stage 2; empty for one-stage training), extension rows a trainable parameter. Keeping the
frozen rows out of the optimizer and out of the autograd graph (`codebook` detaches them)
makes "anchors never move" true by construction, and the codebook loss is additionally
masked by `1[c >= K^a]` as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch
from torch import Tensor, nn


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: spread initial centroids, so Lloyd's iterations rarely end with
    two centroids inside one cluster and another cluster unserved."""
    xt = torch.from_numpy(x)
    n = len(x)
    sq = (xt * xt).sum(1)
    idx = [int(rng.integers(n))]
    d2 = (sq - 2.0 * (xt @ xt[idx[0]]) + sq[idx[0]]).clamp_min(0.0)
    for _ in range(1, k):
        p = d2.double().numpy()
        total = float(p.sum())
        nxt = int(rng.choice(n, p=p / total)) if total > 0 else int(rng.integers(n))
        idx.append(nxt)
        d2 = torch.minimum(d2, (sq - 2.0 * (xt @ xt[nxt]) + sq[nxt]).clamp_min(0.0))
    return x[idx].copy()


def kmeans(x: np.ndarray, k: int, seed: int, niter: int = 20) -> np.ndarray:
    """k centroids of x: k-means++ seeds (fixed seed), then faiss Lloyd iterations. With
    fewer points than k, the spare rows are jittered copies of points; they start as dead
    codes and are re-seeded during training."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    rng = np.random.default_rng(seed)
    if n == 0:
        return rng.normal(0.0, 1e-2, size=(k, d)).astype(np.float32)
    if n <= k:
        extra = x[rng.integers(0, n, size=k - n)]
        scale = float(x.std()) * 1e-2 + 1e-6
        spare = extra + rng.normal(0.0, scale, size=extra.shape).astype(np.float32)
        return np.concatenate([x, spare]).astype(np.float32)
    km = faiss.Kmeans(d, k, niter=niter, seed=int(seed), verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=1 << 20)
    km.train(x, init_centroids=kmeans_plus_plus(x, k, rng))
    return np.asarray(km.centroids, dtype=np.float32).copy()


@dataclass
class RQOutput:
    """Per-layer results of a full-depth pass; masks by SARQ depth are applied afterwards."""

    codes: Tensor       # (B, L) long
    quantized: Tensor   # (B, L, h): C_l[c_l], carries gradient to trainable codebook rows
    residuals: Tensor   # (B, L, h): r_l, carries gradient to the encoder
    trainable: Tensor   # (B, L) bool: c_l is an extension (trainable) row


class ResidualQuantizer(nn.Module):
    """Greedy residual quantization over per-layer codebooks [anchors ; extension]."""

    def __init__(self, ext_sizes: list[int], dim: int, anchors: list[Tensor] | None = None):
        super().__init__()
        self.dim = int(dim)
        anchors = anchors if anchors is not None else [torch.zeros(0, dim) for _ in ext_sizes]
        if len(anchors) != len(ext_sizes):
            raise ValueError("one anchor block per layer is required")
        for layer, block in enumerate(anchors):
            self.register_buffer(f"anchor_{layer}", block.detach().clone().float())
        self.ext = nn.ParameterList([nn.Parameter(torch.zeros(int(k), dim)) for k in ext_sizes])

    @property
    def n_layers(self) -> int:
        return len(self.ext)

    def anchor(self, layer: int) -> Tensor:
        return getattr(self, f"anchor_{layer}")

    @property
    def anchor_sizes(self) -> list[int]:
        return [int(self.anchor(layer).shape[0]) for layer in range(self.n_layers)]

    @property
    def sizes(self) -> list[int]:
        """Total rows per layer (anchors + extension): the SID vocabulary of each layer."""
        return [a + int(e.shape[0]) for a, e in zip(self.anchor_sizes, self.ext)]

    def codebook(self, layer: int) -> Tensor:
        """[anchors ; extension]. The anchors are detached: no gradient reaches them even if
        they were made trainable, so no optimizer (weight decay included) can move them."""
        return torch.cat([self.anchor(layer).detach(), self.ext[layer]], dim=0)

    @staticmethod
    def nearest(r: Tensor, book: Tensor) -> tuple[Tensor, Tensor]:
        """Index of and squared distance to the nearest row (ties: lowest index).

        One matmul on -2r, then in-place adds of ||r||^2 and ||C_k||^2: the same floating-point
        operations in the same order as ||r||^2 - 2 r.C_k + ||C_k||^2 (so bit-identical codes),
        with one (N, K) temporary instead of four."""
        d = torch.mm(r * -2.0, book.T).add_((r * r).sum(1, keepdim=True)).add_((book * book).sum(1))
        dist, idx = d.min(dim=1)
        return idx, dist.clamp_min(0.0)

    def forward(self, z: Tensor, n_layers: int | None = None) -> RQOutput:
        """Full-depth greedy pass: c_l = argmin ||r_l - C_l[k]||, r_{l+1} = r_l - sg[C_l[c_l]]."""
        n_layers = self.n_layers if n_layers is None else n_layers
        r = z
        codes, quantized, residuals, trainable = [], [], [], []
        for layer in range(n_layers):
            book = self.codebook(layer)
            idx, _ = self.nearest(r.detach(), book.detach())
            q = book[idx]
            codes.append(idx)
            quantized.append(q)
            residuals.append(r)
            trainable.append(idx >= self.anchor_sizes[layer])
            r = r - q.detach()
        return RQOutput(torch.stack(codes, 1), torch.stack(quantized, 1),
                        torch.stack(residuals, 1), torch.stack(trainable, 1))

    def extend(self, layer: int, rows: Tensor) -> None:
        """Append extension rows to one layer (new items far from every code)."""
        old = self.ext[layer].data
        self.ext[layer] = nn.Parameter(torch.cat([old, rows.to(old.dtype)], dim=0))

    def state(self) -> dict:
        """Plain tensors, loadable with torch.load(weights_only=True)."""
        return {"dim": self.dim,
                "anchors": [self.anchor(layer).detach().clone() for layer in range(self.n_layers)],
                "ext": [e.detach().clone() for e in self.ext]}

    @classmethod
    def from_state(cls, state: dict) -> ResidualQuantizer:
        q = cls([int(e.shape[0]) for e in state["ext"]], int(state["dim"]), anchors=state["anchors"])
        with torch.no_grad():
            for param, value in zip(q.ext, state["ext"]):
                param.copy_(value)
        return q

    def frozen_as_anchors(self, ext_sizes: list[int]) -> ResidualQuantizer:
        """ACRQ Stage 2: every current row becomes a frozen anchor; new empty extensions."""
        if len(ext_sizes) != self.n_layers:
            raise ValueError("extension sizes need one entry per layer")
        anchors = [self.codebook(layer).detach().clone() for layer in range(self.n_layers)]
        return ResidualQuantizer(ext_sizes, self.dim, anchors=anchors)


def depth_mask(depths: Tensor, n_layers: int) -> Tensor:
    """(B, L) float mask: 1 for layers l < L(i)."""
    return (torch.arange(n_layers, device=depths.device)[None, :] < depths[:, None]).float()


def rq_losses(out: RQOutput, z: Tensor, mask: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(z_hat with straight-through gradient, codebook loss, commitment loss), summed to L(i).

    The codebook term is gradient-masked to extension rows: 1[c_l >= K^a_l]."""
    quant_err = ((out.residuals.detach() - out.quantized) ** 2).sum(-1)
    commit_err = ((out.residuals - out.quantized.detach()) ** 2).sum(-1)
    codebook = (quant_err * mask * out.trainable.float()).sum(1).mean()
    commit = beta * (commit_err * mask).sum(1).mean()
    z_q = (out.quantized * mask[..., None]).sum(1)
    z_hat = z + (z_q - z).detach()
    return z_hat, codebook, commit


@torch.no_grad()
def init_rows_kmeans(quantizer: ResidualQuantizer, z: Tensor, seed: int, niter: int = 20) -> None:
    """Initialise every layer's extension rows by k-means on the residuals of z, layer by
    layer (residuals flow through the rows initialised so far, anchors included)."""
    r = z.detach().float()
    for layer in range(quantizer.n_layers):
        k = int(quantizer.ext[layer].shape[0])
        if k > 0:
            centroids = kmeans(r.cpu().numpy(), k, seed=seed + layer, niter=niter)
            quantizer.ext[layer].copy_(torch.from_numpy(centroids))
        book = quantizer.codebook(layer)
        idx, _ = quantizer.nearest(r, book)
        r = r - book[idx]


@torch.no_grad()
def reseed_dead_rows(quantizer: ResidualQuantizer, out: RQOutput, mask: Tensor) -> list[int]:
    """Move trainable rows that no item used to the residuals worst served by their code.

    Deterministic: items are ranked by quantization error (ties by index). Returns the
    number of re-seeded rows per layer."""
    reseeded = []
    for layer in range(quantizer.n_layers):
        a = quantizer.anchor_sizes[layer]
        active = mask[:, layer] > 0
        codes = out.codes[active, layer]
        counts = torch.bincount(codes, minlength=quantizer.sizes[layer])[a:]
        dead = torch.nonzero(counts == 0).flatten()
        if dead.numel() == 0 or codes.numel() == 0:
            reseeded.append(0)
            continue
        res = out.residuals[active, layer]
        err = ((res - out.quantized[active, layer]) ** 2).sum(-1)
        order = torch.argsort(err, descending=True, stable=True)
        take = order[torch.arange(dead.numel()) % order.numel()]
        quantizer.ext[layer].data[dead] = res[take].to(quantizer.ext[layer].dtype)
        reseeded.append(int(dead.numel()))
    return reseeded

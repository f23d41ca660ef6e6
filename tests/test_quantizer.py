"""Residual quantizer core: assignment, straight-through gradients, depth masks, dead codes."""
from __future__ import annotations

import numpy as np
import torch

from components.tokenizers.quantizer import ResidualQuantizer, depth_mask, init_rows_kmeans, reseed_dead_rows, rq_losses
from components.tokenizers.rq_kmeans import fit_rq_kmeans
from components.tokenizers.rqvae import RQVAE


def _clusters(n_per: int = 30, k: int = 4, dim: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 5
    labels = np.repeat(np.arange(k), n_per)
    return (centers[labels] + 0.1 * rng.normal(size=(len(labels), dim))).astype(np.float32), labels


def test_greedy_residual_assignment_matches_definition():
    torch.manual_seed(0)
    q = ResidualQuantizer([5, 7], 3)
    with torch.no_grad():
        for e in q.ext:
            e.normal_()
    z = torch.randn(20, 3)
    out = q(z)
    r = z.clone()
    for layer in range(2):
        book = q.codebook(layer)
        expect = torch.cdist(r, book).argmin(1)
        assert torch.equal(out.codes[:, layer], expect)
        r = r - book[expect]


def test_rq_kmeans_first_layer_separates_clusters():
    x, labels = _clusters()
    q = fit_rq_kmeans(x, [4, 4], seed=0, niter=10)
    codes = q(torch.from_numpy(x)).codes[:, 0].numpy()
    # one code per cluster, and four different codes
    assert all(len(set(codes[labels == c])) == 1 for c in range(4))
    assert len(set(codes)) == 4


def test_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    model = RQVAE(6, [8], 4, ResidualQuantizer([3, 3], 4))
    x = torch.randn(16, 6)
    with torch.no_grad():
        init_rows_kmeans(model.quantizer, model.encoder(x), seed=0, niter=5)
    z = model.encoder(x)
    z.retain_grad()
    out = model.quantizer(z)
    z_hat, _, _ = rq_losses(out, z, depth_mask(torch.full((16,), 2), 2), beta=0.25)
    z_hat.retain_grad()
    recon = ((x - model.decoder(z_hat)) ** 2).sum()
    recon.backward()
    grad = model.encoder[0].weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    # the estimator passes the decoder's gradient to z unchanged
    assert torch.allclose(z.grad, z_hat.grad)
    # and the codebooks get none from the reconstruction term
    assert all(e.grad is None or float(e.grad.abs().sum()) == 0 for e in model.quantizer.ext)


def test_depth_mask_stops_losses_and_gradient_after_depth():
    torch.manual_seed(0)
    q = ResidualQuantizer([3, 3], 4)
    with torch.no_grad():
        for e in q.ext:
            e.normal_()
    z = torch.randn(10, 4, requires_grad=True)
    out = q(z)
    z_hat, codebook, commit = rq_losses(out, z, depth_mask(torch.ones(10, dtype=torch.long), 2), beta=0.25)
    (codebook + commit).backward()
    assert q.ext[1].grad is None or float(q.ext[1].grad.abs().sum()) == 0
    assert float(q.ext[0].grad.abs().sum()) > 0
    # z_hat holds only the first layer's code
    assert torch.allclose(z_hat, out.quantized[:, 0])


def test_dead_rows_are_reseeded_at_the_worst_served_residuals():
    x, labels = _clusters(k=3)
    q = ResidualQuantizer([4], x.shape[1])
    z = torch.from_numpy(x)
    with torch.no_grad():
        q.ext[0][0] = z[labels == 0].mean(0)
        q.ext[0][1] = z[labels == 1].mean(0)
        q.ext[0][2:] = 1e3  # far from everything: dead; cluster 2 is served badly
    out = q(z)
    err = ((out.residuals[:, 0] - out.quantized[:, 0]) ** 2).sum(-1)
    worst = torch.argsort(err, descending=True, stable=True)[:2]
    assert reseed_dead_rows(q, out, depth_mask(torch.ones(len(z), dtype=torch.long), 1)) == [2]
    assert torch.equal(q.ext[0][2], z[worst[0]]) and torch.equal(q.ext[0][3], z[worst[1]])
    assert set(q(z).codes[labels == 2, 0].tolist()) <= {2, 3}

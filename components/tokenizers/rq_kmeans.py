"""RQ-KMeans, the production baseline: no encoder, k-means on x then on each layer's residuals
(tokenizer.method: rqkmeans)."""
from __future__ import annotations

import numpy as np
import torch

from components.tokenizers.quantizer import ResidualQuantizer, init_rows_kmeans
from components.tokenizers.tokenizer_stages import HeadRun, make_tokenizer


def fit_rq_kmeans(x: np.ndarray, sizes: list[int], seed: int, niter: int = 20) -> ResidualQuantizer:
    """Layer-wise k-means on the residuals of all rows of x (faiss, fixed seed per layer)."""
    quantizer = ResidualQuantizer(list(sizes), int(x.shape[1]))
    init_rows_kmeans(quantizer, torch.from_numpy(np.asarray(x, dtype=np.float32)), seed=seed, niter=niter)
    return quantizer


def train_head(run: HeadRun) -> None:
    """The only stage: the quantizer of all items, no model (assign_ids encodes with it)."""
    quantizer = fit_rq_kmeans(run.x, run.cfg.sizes, run.cfg.seed, run.cfg.kmeans_iters)
    run.ckpt["tokenizer"] = make_tokenizer(run.cfg, None, quantizer, run.version).state()
    run.summary["n_train"] = len(run.x)


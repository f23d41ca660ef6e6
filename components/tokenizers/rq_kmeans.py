"""RQ-KMeans, the production baseline: no encoder, k-means on x then on each layer's residuals."""
from __future__ import annotations

import numpy as np
import torch

from components.tokenizers.quantizer import ResidualQuantizer, init_rows_kmeans


def fit_rq_kmeans(x: np.ndarray, sizes: list[int], seed: int, niter: int = 20) -> ResidualQuantizer:
    """Layer-wise k-means on the residuals of all rows of x (faiss, fixed seed per layer)."""
    quantizer = ResidualQuantizer(list(sizes), int(x.shape[1]))
    init_rows_kmeans(quantizer, torch.from_numpy(np.asarray(x, dtype=np.float32)), seed=seed, niter=niter)
    return quantizer

"""Semantic-ID tokenizers: the residual quantizer, RQ-KMeans, RQ-VAE, SARQ, ACRQ, SID tables."""

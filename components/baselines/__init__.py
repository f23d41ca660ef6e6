"""Non-generative baselines: BM25 / dense / most-popular, SASRec (cornac), the two-tower model."""

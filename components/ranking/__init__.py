"""Ranking primitives shared by the retriever, the baselines and the evaluation: exact top-k, the
ranked-results frame, query rows, the BM25 index and the item-level metrics. Below retrieval and
baselines, so neither has to import the other (or the evaluation) for them."""

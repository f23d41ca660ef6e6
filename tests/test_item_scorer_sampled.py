"""The item scorer's sampled softmax (issue 24: a million-item catalog): when it is chosen, what it scores,
and that it learns the ranking the full softmax learns."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_params, write_catalog

from components.retrieval.item_scorer import (
    FULL_SOFTMAX_UP_TO,
    SAMPLED_NEGATIVES,
    ItemScorer,
    negatives_for,
    sampled_candidates,
)
from components.retrieval.retriever import load_retriever, model_config
from components.retrieval.retriever_train import run_train_retriever
from components.runtime.config import deep_merge
from components.runtime.config_schema import check_params
from components.runtime.errors import ConfigError


@pytest.mark.parametrize(("setting", "n_items", "expect"), [
    (None, FULL_SOFTMAX_UP_TO, 0), ("auto", FULL_SOFTMAX_UP_TO + 1, SAMPLED_NEGATIVES), ("full", 10**6, 0),
    (64, 1000, 64), (64, 64, 0)])
def test_sampling_is_chosen_by_catalog_size_or_asked(setting, n_items, expect):
    assert negatives_for(setting, n_items) == expect


def test_a_bad_negatives_setting_is_one_line_naming_the_key(tmp_path):
    params = deep_merge(tiny_params(tmp_path), {"retriever": {"item_head_negatives": 0}})
    with pytest.raises(ConfigError, match="retriever.item_head_negatives"):
        check_params(params)


def test_candidates_hold_every_target_with_its_label_and_log_q():
    share = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0])
    targets = torch.tensor([0, 0, 2, 1])
    rows, label, log_q = sampled_candidates(targets, share, 6, torch.Generator().manual_seed(0))
    assert (rows[label] == targets).all() and len(set(rows.tolist())) == len(rows)
    assert torch.allclose(log_q, (4 * share[rows] + 6 / 8).log())   # expected draws of each candidate in a step


def _train(scorer: ItemScorer, enc: torch.Tensor, targets: torch.Tensor, item_emb: torch.Tensor, share: torch.Tensor,
           negatives: int, steps: int = 300) -> None:
    opt = torch.optim.Adam(scorer.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(enc.shape[:2], dtype=torch.bool)
    for _ in range(steps):
        batch = torch.randint(0, len(targets), (64,), generator=gen)
        q = scorer.query_vectors(enc[batch], mask[batch])
        if negatives:
            rows, label, log_q = sampled_candidates(targets[batch], share, negatives, gen)
            logits = scorer.logits(q, scorer.item_vectors(item_emb, rows=rows)) - log_q
        else:
            rows, label = None, targets[batch]
            logits = scorer.logits(q, scorer.item_vectors(item_emb))
        opt.zero_grad()
        F.cross_entropy(logits, label).backward()
        opt.step()


def test_the_sampled_softmax_recovers_the_full_softmax_ranking():
    """400 items in 8 topics with Zipf popularity; a query reads its topic. Trained with 40 uniform negatives a
    step plus the batch's targets (log-Q corrected), the scorer ranks each topic's items as the full softmax
    does; without the correction, the in-batch negatives push the popular items down and the ranking drifts."""
    rng = np.random.default_rng(0)
    n_items, n_topics, dim = 400, 8, 16
    topic = rng.integers(0, n_topics, n_items)
    centres = rng.normal(size=(n_topics, dim))
    item_emb = torch.tensor(centres[topic] + 0.8 * rng.normal(size=(n_items, dim)), dtype=torch.float32)
    pop = 1.0 / (1 + rng.permutation(n_items)) ** 1.1
    q_topic = rng.integers(0, n_topics, 3000)
    targets = np.array([rng.choice(np.flatnonzero(topic == t), p=pop[topic == t] / pop[topic == t].sum())
                        for t in q_topic])
    enc = torch.tensor(centres[q_topic][:, None, :] + 0.3 * rng.normal(size=(3000, 1, dim)), dtype=torch.float32)
    share = torch.tensor(np.bincount(targets, minlength=n_items) / len(targets), dtype=torch.float32)
    t = torch.as_tensor(targets)
    emb = torch.as_tensor(item_emb)

    def scores(negatives: int, correct: bool = True) -> np.ndarray:
        torch.manual_seed(0)
        scorer = ItemScorer(dim, dim)
        _train(scorer, enc, t, emb, share if correct else torch.zeros_like(share) + 1e-12, negatives)
        with torch.no_grad():
            probe = torch.tensor(centres[:, None, :], dtype=torch.float32)
            return scorer.logits(scorer.query_vectors(probe, torch.ones(n_topics, 1, dtype=torch.bool)),
                                 scorer.item_vectors(emb)).numpy()

    def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
        return float(np.mean([len(set(np.argsort(-x)[:k]) & set(np.argsort(-y)[:k])) / k for x, y in zip(a, b)]))

    full, sampled = scores(0), scores(40)
    assert top_overlap(full, sampled) >= 0.7
    assert top_overlap(full, sampled) > top_overlap(full, scores(40, correct=False))


def test_a_sampled_scorer_trains_through_the_retriever_and_records_it(tmp_path):
    write_catalog(tmp_path)
    params = tiny_params(tmp_path, epochs=1, item_head_negatives=8, fusion={"sources": "none"})
    run_train_retriever(params)
    model = load_retriever(tmp_path / "retriever" / "model.pt")
    assert model.config["item_negatives"] == 8
    default = model_config(tiny_params(tmp_path)["retriever"], (4, 4), 8, 5, n_items=100)
    assert "item_negatives" not in default   # a full softmax: the checkpoint config stays as it was

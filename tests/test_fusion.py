"""The hybrid ranking (components/retrieval/fusion.py) and the retriever's item scorer (components/retrieval/item_scorer.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import plain_retriever
from hypothesis import given, settings
from hypothesis import strategies as st

from components.retrieval.fusion import (
    FusionCandidates,
    Ranked,
    choose_fusion,
    dense_ranking,
    fuse,
    fusion_config,
    recall_at,
    recall_of_top,
    weight_grid,
)
from components.retrieval.retriever import RetrieverModel, model_config
from components.runtime.config import deep_merge
from components.runtime.errors import ConfigError

RP = plain_retriever(backbone="small", d_model=32, n_heads=2, n_layers=1, decoder_layers=1, ff_dim=64, dropout=0.0,
                     n_memory=2, history_sid_tokens=True, item_id_embeddings=True)


def _ranked(lists: list[list[int]]) -> Ranked:
    return Ranked(np.array([i for lst in lists for i in lst], dtype=np.int64),
                  np.zeros(sum(map(len, lists)), np.float32), np.array([len(lst) for lst in lists]))


def _lists(r: Ranked) -> list[list[int]]:
    ends = np.cumsum(r.per_query)
    return [r.items[e - n: e].tolist() for e, n in zip(ends, r.per_query)]


def test_fusion_weights_move_between_the_orders():
    gen, dense = _ranked([[0, 1, 2], [5]]), _ranked([[3, 2, 0], [6, 5]])
    assert _lists(fuse([gen, dense], [1.0, 0.0], 60, 10)) == [[0, 1, 2, 3], [5, 6]]   # generative order, dense-only after
    assert _lists(fuse([gen, dense], [0.0, 1.0], 60, 10)) == [[3, 2, 0, 1], [6, 5]]   # dense order, generative-only after
    # equal weights: an item both lists rank well beats one only the generative list has
    assert _lists(fuse([gen, dense], [0.5, 0.5], 60, 10))[0][:2] == [0, 2]
    # a third list breaks the tie between the two
    third = _ranked([[2], [6]])
    assert _lists(fuse([gen, dense, third], [0.4, 0.3, 0.3], 60, 10))[0][0] == 2


def test_weight_grid_covers_the_simplex():
    grid = weight_grid(3)
    assert len(grid) == 66 and len(set(grid)) == 66
    assert all(abs(sum(w) - 1) < 1e-9 and min(w) >= 0 for w in grid)
    assert grid[0] == (1.0, 0.0, 0.0) and (0.0, 0.0, 1.0) in grid and (0.3, 0.3, 0.4) in grid


def test_recall_and_the_validation_choice():
    targets = np.array([[3], [6], [9]])
    gen, dense = _ranked([[0, 1, 2], [5, 6], [9]]), _ranked([[3, 0], [6], [8]])
    assert recall_at(gen, targets, 1) == pytest.approx(1 / 3)
    assert recall_at(gen, targets, 2) == pytest.approx(2 / 3)
    weights, rrf_k, grid = choose_fusion(gen, {"zero_shot": dense}, targets, 1, 60, 10)
    best = max(t["recall@1"] for t in grid)
    assert best == pytest.approx(2 / 3) and weights[0] < 1.0       # the generated list alone: 1 / 3
    # ties go to the largest generated weight
    assert weights[0] == max(t["weights"]["generated"] for t in grid if t["recall@1"] == best)
    assert len(grid) == 11 and rrf_k == 60
    # when the generative list is better at every weight, it stays alone
    weights, rrf_k, _ = choose_fusion(_ranked([[3], [6], [9]]), {"zero_shot": _ranked([[0], [1], [2]])}, targets,
                                      1, [20, 60], 10)
    assert weights == [1.0, 0.0] and rrf_k == 20                # a tie between constants: the one listed first


def test_the_reciprocal_rank_constant_is_chosen_on_validation():
    """Target 7 is first in the dense list only; item 1 is first generated and second dense. 7 leads
    when w_dense / (k + 2) > w_generated: at w = (0.2, 0.8) only with k = 1, at (0, 1) with any k."""
    gen, dense, targets = _ranked([[1, 2, 3]]), _ranked([[7, 1]]), np.array([[7]])
    weights, rrf_k, grid = choose_fusion(gen, {"zero_shot": dense}, targets, 1, [100, 1], 10)
    assert len(grid) == 22 and {t["rrf_k"] for t in grid} == {1, 100}
    assert [t["weights"]["generated"] for t in grid if t["recall@1"] == 1.0 and t["rrf_k"] == 100] == [0.0]
    assert weights == [0.2, 0.8] and rrf_k == 1      # the larger generated weight wins over the order listed


def test_dense_ranking_is_the_exact_top_k():
    rng = np.random.default_rng(0)
    q, items = rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=(40, 5)).astype(np.float32)
    top = dense_ranking(q, items, 6, chunk=3).top(6)
    assert (top == np.argsort(-(q @ items.T), axis=1, kind="stable")[:, :6]).all()


def test_dense_ranking_ties_rank_by_item_row_in_any_batch():
    """A two-item history's mean is exactly as close to either item: the lower row wins, whatever the batch."""
    rng = np.random.default_rng(1)
    items = rng.normal(size=(50, 384)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    tied = items[[31, 7]].mean(0)
    tied /= np.linalg.norm(tied)
    others = rng.normal(size=(37, 384)).astype(np.float32)
    for batch, row in ((tied[None], 0), (np.vstack([others[:5], tied, others[5:]]), 5)):
        assert dense_ranking(batch, items, 2).top(2)[row].tolist() == [7, 31]


def _fusion(smoke_params: dict, item_head: bool = True, **fusion) -> dict:
    return fusion_config(deep_merge(smoke_params, {"retriever": {"item_head": item_head, "fusion": fusion}}))


def test_fusion_config_fills_and_refuses(smoke_params):
    """The checked retriever.fusion as the fusion choice reads it: auto resolved by the item scorer,
    weights normalised, rrf_k a list; a bad value names its key (the schema's check, once)."""
    assert _fusion(smoke_params, sources="auto")["sources"] == ["learned", "zero_shot", "bm25"]
    assert _fusion(smoke_params, False, sources="auto")["sources"] == ["zero_shot", "bm25"]
    assert _fusion(smoke_params, sources=["zero_shot"], weights=[3, 1])["weights"] == [0.75, 0.25]
    with pytest.raises(ConfigError, match="retriever.fusion.sources"):
        _fusion(smoke_params, sources=["bm3"])
    with pytest.raises(ConfigError, match="retriever.fusion.bm25_history"):
        _fusion(smoke_params, sources=["bm25"], bm25_history=0)
    with pytest.raises(ConfigError, match="item_head"):
        _fusion(smoke_params, False, sources=["learned"])
    with pytest.raises(ConfigError, match="retriever.fusion.weights"):
        _fusion(smoke_params, sources=["zero_shot"], weights=[1.0])
    with pytest.raises(ConfigError, match="retriever.fusion.depth"):
        _fusion(smoke_params, sources="none", depth=0)
    assert _fusion(smoke_params, sources="none", rrf_k=[20, 60])["rrf_k"] == [20, 60]
    assert _fusion(smoke_params, sources="none", rrf_k=20)["rrf_k"] == [20]
    with pytest.raises(ConfigError, match="retriever.fusion.rrf_k"):
        _fusion(smoke_params, sources="none", rrf_k=[20, 20])


def test_without_the_item_head_the_retriever_is_built_as_before():
    """item_head off: the same initial weights and no new keys, so earlier runs and checkpoints stay valid."""
    torch.manual_seed(0)
    plain = RetrieverModel(model_config(RP, (4, 4), 8, 5, n_items=12))
    torch.manual_seed(0)
    off = RetrieverModel(model_config({**RP, "item_head": False}, (4, 4), 8, 5, n_items=12))
    assert "item_head" not in off.config and off.scorer is None
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), off.state_dict().values()))


def _shift_task(n_items: int = 12, emb: int = 8) -> tuple[np.ndarray, dict, torch.Tensor]:
    """"What comes after item i" is item (i + 5) % n: nothing the text vectors say, only learnable."""
    item_emb = np.random.default_rng(0).normal(size=(n_items, emb)).astype(np.float32)
    hist = torch.arange(n_items)[:, None]
    target = (hist[:, 0] + 5) % n_items
    batch = {"kind": "history", "x": torch.from_numpy(item_emb)[hist], "mask": torch.ones(n_items, 1, dtype=torch.bool),
             "hist_items": hist, "hist_tokens": torch.zeros(n_items, 1, 2, dtype=torch.long),
             "dec_in": torch.full((n_items, 2), 1), "target": torch.zeros(n_items, 2, dtype=torch.long),
             "target_item": target}
    return item_emb, batch, target


@pytest.mark.parametrize("encoder", ["shared", "own"])
def test_the_item_head_learns_to_rank_the_target_first(encoder):
    torch.manual_seed(0)
    n_items, emb = 12, 8
    net = RetrieverModel(model_config({**RP, "item_head": True, "item_head_encoder": encoder}, (4, 4), emb, 5,
                                      n_items=n_items))
    item_emb, batch, target = _shift_task(n_items, emb)
    net.attach_items(item_emb)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        net.loss(batch).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        scores = net.query_vectors(batch) @ net.item_vectors().T
    assert (scores.argmax(1) == target).float().mean() == 1.0


def test_an_own_scorer_encoder_leaves_the_sid_encoder_to_the_sid_loss():
    """item_head_encoder own: the scorer's loss reaches its own tower and never the SID encoder; shared, it does."""
    item_emb, batch, _ = _shift_task()
    for encoder, reaches_sid_encoder in (("shared", True), ("own", False)):
        torch.manual_seed(0)
        net = RetrieverModel(model_config({**RP, "item_head": True, "item_head_encoder": encoder}, (4, 4), 8, 5,
                                          n_items=12))
        net.attach_items(item_emb)
        qvec = net._forward(batch)[1]
        net.scorer.logits(qvec, net.item_vectors()).logsumexp(1).sum().backward()
        grads = [p.grad for p in net.backbone.encoder.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == reaches_sid_encoder
        assert (net.scorer_tower is not None) == (encoder == "own")
    torch.manual_seed(0)
    shared = RetrieverModel(model_config({**RP, "item_head": True}, (4, 4), 8, 5, n_items=12))
    assert "item_head_encoder" not in shared.config      # the default keeps earlier checkpoints' configs


def test_cold_items_score_by_their_text_alone_and_their_id_rows_learn_nothing():
    """cold_item_rows text: an item without training interactions gets the text-only vector (the zero id row
    items added after training share) and the softmax never pushes its own id row down; learned keeps the row."""
    item_emb, batch, _ = _shift_task()
    popularity = np.ones(12, dtype=np.int64)
    popularity[[3, 7]] = 0
    for mode in ("text", "learned"):
        torch.manual_seed(0)
        net = RetrieverModel(model_config({**RP, "item_head": True, "cold_item_rows": mode}, (4, 4), 8, 5,
                                          n_items=12))
        net.attach_items(item_emb, popularity)
        net.loss(batch).backward()
        id_grad = net.scorer.item_ids.weight.grad
        with torch.no_grad():
            vec = net.item_vectors()
            text_only = torch.nn.functional.normalize(net.scorer.item_text(torch.from_numpy(item_emb)), dim=-1)
        cold_is_text = torch.allclose(vec[[3, 7]], text_only[[3, 7]])
        assert cold_is_text == (mode == "text")
        assert not torch.allclose(vec[[0, 1]], text_only[[0, 1]])           # warm items keep their id rows
        assert (id_grad[[3, 7]].abs().sum() == 0) == (mode == "text")
    assert "cold_item_rows" not in RetrieverModel(model_config({**RP, "item_head": True}, (4, 4), 8, 5, n_items=12)).config


def _drawn_fusion(data) -> tuple[int, int, list[Ranked], list[float]]:
    """A few queries, 2-4 ranked lists over a small item pool (equal scores are common) and their weights."""
    n_q, n_items = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 12))
    lists = []
    for _ in range(data.draw(st.integers(2, 4))):
        lists.append(_ranked([data.draw(st.lists(st.integers(0, n_items - 1), max_size=n_items, unique=True))
                              for _ in range(n_q)]))
    weights = data.draw(st.lists(st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]), min_size=len(lists),
                                 max_size=len(lists)))
    return n_q, n_items, lists, weights


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_the_grid_s_top_k_is_the_full_fusion_s_top_k(data):
    """`FusionCandidates.top` (the validation grid's shortcut) equals sorting the whole fusion, ties included:
    small item pools make equal scores common."""
    n_q, n_items, lists, weights = _drawn_fusion(data)
    rrf_k, k = data.draw(st.sampled_from([1, 20, 60])), data.draw(st.integers(1, 5))
    candidates = FusionCandidates(lists, n_items)
    np.testing.assert_array_equal(candidates.top(weights, rrf_k, k), fuse(lists, weights, rrf_k, n_items).top(k))


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_each_target_s_rank_gives_the_recall_of_the_full_fusion_at_every_k(data):
    """`target_ranks` (the grid's recall at deep budgets, one comparison per target) gives the recall of
    sorting the whole fusion at every k, ties included, targets no list holds included."""
    from components.retrieval.fusion import recall_of_ranks

    n_q, n_items, lists, weights = _drawn_fusion(data)
    rrf_k = data.draw(st.sampled_from([1, 20, 60]))
    targets = np.array([data.draw(st.lists(st.integers(-1, n_items - 1), min_size=2, max_size=2))
                        for _ in range(n_q)])
    candidates = FusionCandidates(lists, n_items)
    ranks = candidates.target_ranks(weights, rrf_k, candidates.target_pairs(targets))
    full = fuse(lists, weights, rrf_k, n_items)
    for k in range(1, n_items + 2):
        expect, got = recall_of_top(full.top(k), targets), recall_of_ranks(ranks, targets, k)
        assert (np.isnan(expect) and np.isnan(got)) or got == pytest.approx(expect)

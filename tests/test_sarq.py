"""SARQ: path table arithmetic, the stopping rule, and fixed length at tau = inf."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import make_catalog, run_tokenizer, tiny_params

from components.runtime.errors import ConfigError
from components.tokenizers.sarq import PathTable, choose_tau, items_per_sid, parse_tau, popularity_weights, stop_depths
from components.tokenizers.sid_tokenizer import Tokenizer, load_checkpoint
from components.tokenizers.tokenizer_stages import load_catalog, run_train_head, tokenizer_config

# hand-made catalog over 2 x 3 x 2 codes: 6 items under (0,), 2 under (1,)
CODES = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0], [0, 1, 1], [0, 2, 0], [1, 0, 0], [1, 0, 1]])
SIZES = [2, 3, 2]


def _expected_information(path: tuple[int, ...], a: float) -> list[float]:
    """I_l by hand: counts of items under each prefix, additive smoothing a over K_l children."""
    rows = [tuple(r) for r in CODES.tolist()]
    info, parent_n = [], len(rows)
    for layer in range(len(path)):
        child_n = sum(r[: layer + 1] == path[: layer + 1] for r in rows)
        p = (child_n + a) / (parent_n + a * SIZES[layer])
        info.append((info[-1] if info else 0.0) - math.log(p))
        parent_n = child_n
    return info


@pytest.mark.parametrize("path", [(0, 0, 0), (0, 2, 0), (1, 0, 1), (1, 2, 1)])
def test_path_information_matches_the_chain_rule(path):
    table = PathTable.build(CODES, SIZES, smoothing=0.5)
    got = table.information(torch.tensor([path]))[0].tolist()
    assert got == pytest.approx(_expected_information(path, 0.5), rel=1e-12)


def test_stops_exactly_where_information_first_exceeds_tau():
    table = PathTable.build(CODES, SIZES, smoothing=1.0)
    path = torch.tensor([[0, 2, 1]])
    i1, i2, i3 = table.information(path)[0].tolist()
    assert i1 < i2 < i3
    info = table.information(path)
    depth = lambda tau, lo=1, hi=3: int(stop_depths(info, tau, lo, hi)[0])  # noqa: E731
    assert depth(i1 - 1e-9) == 1            # I_1 > tau: keep c_1, stop
    assert depth(i1) == 2                   # I_1 == tau does not exceed it
    assert depth((i1 + i2) / 2) == 2
    assert depth((i2 + i3) / 2) == 3
    assert depth(i1 - 1e-9, lo=2) == 2      # L_min wins over an early stop
    assert depth(i3 + 1, hi=2) == 2         # L_max caps
    assert depth(math.inf) == 3


def test_vectorised_rule_equals_per_item_loop():
    rng = np.random.default_rng(0)
    info = torch.from_numpy(np.cumsum(rng.uniform(0, 3, size=(200, 4)), axis=1))
    got = stop_depths(info, 4.0, 2, 4).tolist()
    for row, d in zip(info.tolist(), got):
        first = next((l + 1 for l, v in enumerate(row) if v > 4.0), 4)
        assert d == min(max(first, 2), 4)


def test_unseen_extension_code_gets_the_smoothed_floor_and_table_stays_frozen():
    table = PathTable.build(CODES, SIZES, smoothing=1.0)
    before = table.information(CODES).clone()
    unseen = table.log_conditional(torch.tensor([[5, 0, 0]]))[0]  # row 5: an extension row
    assert float(unseen[0]) == pytest.approx(math.log(1 / (8 + 2)))
    assert float(unseen[1]) == pytest.approx(math.log(1 / 3))     # unseen prefix: uniform 1/K_2
    assert torch.equal(table.information(CODES), before)


def test_popularity_weights_and_tau_parsing():
    w = popularity_weights(torch.tensor([0, 2, 4, 6]))
    assert float(w.mean()) == pytest.approx(1.0) and float(w[0]) == 0.0
    assert torch.equal(popularity_weights(torch.zeros(3)), torch.ones(3, dtype=torch.float64))
    weighted = PathTable.build(CODES[:2], [2, 3, 2], 1.0, weights=torch.tensor([3.0, 1.0]))
    assert weighted.counts[2].tolist() == [3.0, 1.0]
    assert parse_tau(None) == math.inf and parse_tau("inf") == math.inf
    with pytest.raises(ConfigError, match="tokenizer.sarq.tau"):
        parse_tau("deep")


def test_tau_inf_gives_fixed_length(tmp_path):
    make_catalog(tmp_path)
    table = run_tokenizer(tiny_params(tmp_path, "sarq", "tokenizer.sarq.tau=.inf"))
    assert set(table["length"]) == {3}


def test_finite_tau_gives_adaptive_length_within_bounds(tmp_path):
    make_catalog(tmp_path)
    table = run_tokenizer(tiny_params(tmp_path, "sarq", "tokenizer.sarq.tau=3.0", "tokenizer.sarq.min_len=2"))
    assert table["length"].min() >= 2 and table["length"].max() <= 3
    assert table["length"].nunique() == 2


def test_unique_floor_splits_shared_sids_with_their_own_next_codes():
    from components.tokenizers.sarq import unique_floor

    codes = np.array([[0, 1, 5], [0, 1, 6], [0, 2, 7], [3, 4, 8], [3, 4, 8]])
    lengths = np.array([2, 2, 2, 1, 1])
    out = unique_floor(codes, lengths, max_len=3)
    # (0,1) is shared -> both go to length 3 and split; (0,2) is alone -> kept; (3) and (3,4) stay shared at max_len
    assert out.tolist() == [3, 3, 2, 3, 3]
    assert unique_floor(codes[:3], np.array([3, 3, 2]), 3).tolist() == [3, 3, 2]   # already distinct: unchanged


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 20)), min_size=1, max_size=40),
       st.integers(1, 3))
def test_unique_floor_only_raises_and_leaves_no_avoidable_duplicate(rows, start):
    from components.tokenizers.sarq import unique_floor

    codes = np.array(rows)
    lengths = np.full(len(codes), start)
    out = unique_floor(codes, lengths, max_len=3)
    assert (out >= lengths).all() and (out <= 3).all()
    sids = [tuple(c[:n]) for c, n in zip(codes.tolist(), out)]
    for sid, n in zip(sids, out):
        assert sids.count(sid) == 1 or n == 3          # a shared SID is left only at max_len


@pytest.mark.parametrize("method", ["sa2crq", "sarq"])
def test_unique_head_gives_head_items_distinct_sids_and_keeps_tail_lengths(tmp_path, method):
    items, _ = make_catalog(tmp_path / "a")
    make_catalog(tmp_path / "b")
    plain = run_tokenizer(tiny_params(tmp_path / "a", method))
    floor = run_tokenizer(tiny_params(tmp_path / "b", method, "tokenizer.sarq.unique_head=true"))
    head = (items["group"] == "head").to_numpy()
    sids = lambda t: [tuple(c) for c in t["codes"]]  # noqa: E731
    shared = lambda t, mask: len(mask.nonzero()[0]) - len(set(np.array(sids(t), dtype=object)[mask]))  # noqa: E731
    assert shared(plain, head) > 0                                  # the tiny catalog has shared head SIDs
    at_max = floor["length"].to_numpy()[head] == 3
    distinct_or_full = [sids(floor)[i] for i in np.flatnonzero(head)]
    assert all(distinct_or_full.count(s) == 1 for s, full in zip(distinct_or_full, at_max) if not full)
    assert (floor["length"].to_numpy()[head] >= plain["length"].to_numpy()[head]).all()
    # every SID is a prefix of the item's own longer SID: the split uses the item's next codes
    assert all(tuple(b[: len(a)]) == tuple(a) for a, b in zip(plain["codes"], floor["codes"]))
    if method == "sarq":                                            # one stage: tail SIDs untouched
        assert (floor["length"].to_numpy()[~head] == plain["length"].to_numpy()[~head]).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), target=st.floats(1.0, 6.0))
def test_auto_tau_is_the_smallest_candidate_that_meets_the_target(seed, target):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 4, (60, 3), generator=gen)
    table = PathTable.build(codes, [4, 4, 4], smoothing=1.0)
    info = table.information(codes)
    tau = choose_tau(info, codes, target, 1, 3)
    per_sid = lambda t: items_per_sid(codes.numpy(), stop_depths(info, t, 1, 3).numpy())  # noqa: E731
    lower = [float(v) for v in np.unique(info.numpy()) if v < tau]
    if per_sid(math.inf) <= target:                     # reachable: met at tau, missed just below it
        assert per_sid(tau) <= target
        assert not lower or per_sid(lower[-1]) > target
    else:                                               # unreachable: the deepest SIDs there are
        assert per_sid(tau) == per_sid(math.inf)


def test_auto_tau_config_and_training_record_the_chosen_tau(tmp_path):
    make_catalog(tmp_path / "out")
    params = tiny_params(tmp_path / "out", "sarq")
    params["tokenizer"]["sarq"].update(tau="auto", target_items_per_sid=1.2)
    assert tokenizer_config(params).tau_target == 1.2
    run_train_head(params)
    tok = Tokenizer.from_state(load_checkpoint(tmp_path / "out" / "tokenizer" / "head.pt")["tokenizer"])
    assert math.isfinite(tok.tau)
    x = load_catalog(params)[1]
    codes, lengths = tok.assign(x)
    assert items_per_sid(codes, lengths) <= 1.2 or (lengths == tok.max_len).all()
    for bad in (0.5, "many", True):
        params["tokenizer"]["sarq"]["target_items_per_sid"] = bad
        with pytest.raises(ConfigError, match="target_items_per_sid"):
            tokenizer_config(params)

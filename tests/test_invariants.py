"""The method's invariants, each as a test that fails when the invariant breaks.

- SARQ: head SIDs are longer than tail SIDs on a catalog whose head is dense and whose
  tail lies in head-empty regions; an item that takes a row the head table never saw stops there.
- Prefix-free: the stopping rule never issues a SID that is a proper prefix of another;
  `unique_head` keeps the head registry prefix-free, and its only exception in the whole
  table is a tail SID equal to a head SID before lengthening.
- Stability: the Stage-2 tokenizer's anchors, frozen encoder and frozen table reproduce
  every issued head SID (`assert_issued_reencode` fails on moved anchors or an edited
  registry); the written head rows are the registry even where the full Stage-2 codebook
  would encode a head item differently.
- ACRQ: gradient reaches the extension rows used within each item's depth and never an
  anchor row, even when the anchors are made trainable parameters.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import make_catalog, run_tokenizer, tiny_params

import components.tokenizers.tokenizer_stages as stages
from components.runtime.errors import DataError
from components.tokenizers.acrq import anchored_model
from components.tokenizers.quantizer import ResidualQuantizer, init_rows_kmeans
from components.tokenizers.rqvae import RQVAE, SarqSpec, TrainSpec, fit
from components.tokenizers.sarq import PathTable, popularity_weights, stop_depths, unique_floor
from components.tokenizers.sid_table import anchor_tokenizer, issued_table, read_sid_table, reencoded_issued
from components.tokenizers.sid_tokenizer import Tokenizer, load_checkpoint, load_tokenizer, save_checkpoint


def sid_tuples(codes) -> list[tuple[int, ...]]:
    return [tuple(int(c) for c in row) for row in codes]


def prefix_pairs(sids) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(short, long) pairs of distinct SIDs where `short` is a proper prefix of `long`."""
    present = set(sids)
    return sorted({(s[:l], s) for s in present for l in range(1, len(s)) if s[:l] in present})


def make_long_tail_catalog(out_dir: Path, n_head: int = 40, n_tail: int = 100, n_cold: int = 6, dim: int = 24,
                           seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Head items packed around 2 topics, tail and cold items spread over 8 others (regions
    with no head item), as in a long-tail catalog whose popular items share a few subjects."""
    rng = np.random.default_rng(seed)
    head_centers, tail_centers = rng.normal(size=(2, dim)), rng.normal(size=(8, dim))
    n_rest = n_tail + n_cold
    x = np.concatenate([head_centers[rng.integers(0, 2, n_head)] + 0.35 * rng.normal(size=(n_head, dim)),
                        tail_centers[rng.integers(0, 8, n_rest)] + 0.35 * rng.normal(size=(n_rest, dim))])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    popularity = np.concatenate([rng.integers(20, 60, n_head), rng.integers(1, 6, n_tail), np.zeros(n_cold, int)])
    items = pd.DataFrame({"item_id": [f"i{k:03d}" for k in range(len(x))], "text": [f"item {k}" for k in range(len(x))],
                          "popularity": popularity.astype(np.int64),
                          "group": ["head"] * n_head + ["tail"] * n_tail + ["cold"] * n_cold})
    (out_dir / "prepared").mkdir(parents=True, exist_ok=True)
    (out_dir / "embeddings").mkdir(parents=True, exist_ok=True)
    items.to_parquet(out_dir / "prepared" / "items.parquet", index=False)
    np.save(out_dir / "embeddings" / "items.npy", x)
    return items, x


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """sa2crq without unique_head: lengths are the stopping rule's alone."""
    out = tmp_path_factory.mktemp("plain")
    items, x = make_long_tail_catalog(out)
    params = tiny_params(out, "sa2crq", "tokenizer.sarq.unique_head=false")
    return params, items, x, run_tokenizer(params)


@pytest.fixture(scope="module")
def unique_run(tmp_path_factory):
    """sa2crq with unique_head (the default), on the shared test catalog."""
    out = tmp_path_factory.mktemp("unique")
    items, x = make_catalog(out)
    params = tiny_params(out, "sa2crq", "tokenizer.sarq.unique_head=true")
    return params, items, x, run_tokenizer(params)


# ---- SARQ: head longer than tail ------------------------------------------------------------

def test_head_sids_are_longer_than_tail_sids_on_a_long_tail_catalog(plain_run):
    params, items, x, table = plain_run
    length = table["length"].to_numpy()
    group = items["group"].to_numpy()
    mean = {g: float(length[group == g].mean()) for g in ("head", "tail", "cold")}
    assert mean["head"] >= mean["tail"] + 0.75 and mean["head"] >= mean["cold"] + 0.75, mean
    assert np.median(length[group == "head"]) > np.median(length[group != "head"])
    # the mechanism: a row the head table never saw (any extension row) costs at least
    # log((W + a K_1) / a) nats, above tau here, so an item stops at its first such row
    tok = load_tokenizer(params)
    assert tok.tau < np.log(tok.table.total + tok.table.smoothing * tok.table.sizes[0]) - np.log(tok.table.smoothing)
    on_ext = 0
    for codes in table["codes"]:
        first_ext = next((l for l, c in enumerate(codes) if c >= tok.anchor_sizes[l]), None)
        if first_ext is not None:
            on_ext += 1
            assert len(codes) == first_ext + 1, codes
    assert on_ext >= 0.5 * (group != "head").sum()      # the tail does live in head-empty regions


# ---- prefix-free ----------------------------------------------------------------------------

# codes of items the table was built on (rows 0..K-1 of [3, 4, 4]) and of any item (rows K and
# above are rows the table never saw, like extension rows)
seen_3 = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=40)
codes_3 = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=40)


@settings(max_examples=80, deadline=None)
@given(table_codes=seen_3, query_codes=codes_3, weights=st.lists(st.integers(0, 9), min_size=40, max_size=40),
       tau=st.floats(0.0, 6.0), min_len=st.integers(1, 3), max_len=st.integers(1, 3),
       smoothing=st.sampled_from([0.1, 1.0]))
def test_stopping_rule_issues_prefix_free_sids(table_codes, query_codes, weights, tau, min_len, max_len, smoothing):
    """Path information depends on the prefix alone, so two items sharing a prefix stop
    together: no SID is a proper prefix of another, rows the table never saw included."""
    min_len = min(min_len, max_len)
    table = PathTable.build(torch.tensor(table_codes), [3, 4, 4], smoothing,
                            popularity_weights(torch.tensor(weights[: len(table_codes)])))
    codes = torch.tensor(query_codes + table_codes)
    depths = stop_depths(table.information(codes), tau, min_len, max_len)
    sids = [s[:n] for s, n in zip(sid_tuples(codes), depths.tolist())]
    assert prefix_pairs(sids) == []


@settings(max_examples=80, deadline=None)
@given(head_codes=seen_3, tail_codes=codes_3, tau=st.floats(0.0, 6.0))
def test_unique_head_keeps_head_sids_prefix_free_and_its_only_exception_is_known(head_codes, tail_codes, tau):
    """unique_floor lengthens shared head SIDs in lock-step: the head set stays prefix-free.
    A tail SID can be a proper prefix of a head SID only where it equals that head item's
    SID before lengthening (the tail keeps its short SID)."""
    table = PathTable.build(torch.tensor(head_codes), [3, 4, 4], 1.0)
    head, tail = np.array(head_codes), np.array(tail_codes)
    plain = stop_depths(table.information(torch.from_numpy(head)), tau, 1, 3).numpy()
    floor = unique_floor(head, plain, 3)
    tail_len = stop_depths(table.information(torch.from_numpy(tail)), tau, 1, 3).numpy()
    head_sids = [tuple(r[:n]) for r, n in zip(head.tolist(), floor)]
    assert prefix_pairs(head_sids) == []
    before = {(tuple(r[:n]), tuple(r[:m])) for r, n, m in zip(head.tolist(), plain, floor) if m > n}
    tail_sids = {tuple(r[:n]) for r, n in zip(tail.tolist(), tail_len)}
    for short, long in prefix_pairs(head_sids + sorted(tail_sids)):
        assert short in tail_sids and (short, long) in before, (short, long)


def test_written_sid_tables_are_prefix_free_but_for_unique_head(plain_run, unique_run):
    _, _, _, plain = plain_run
    assert prefix_pairs(sid_tuples(plain["codes"])) == []
    params, items, x, table = unique_run
    head_mask = (items["group"] == "head").to_numpy()
    issued = load_checkpoint(Path(params["out_dir"]) / "tokenizer" / "head.pt")["issued"]
    registry = sid_tuples(issued_table(issued, "v")["codes"])
    assert prefix_pairs(registry) == []
    # SIDs before lengthening: Stage 1's own lengths for the issued codes
    stage1 = Tokenizer.from_state(load_checkpoint(Path(params["out_dir"]) / "tokenizer" / "head.pt")["tokenizer"])
    plain_len = stage1.depths(issued["codes"]).numpy()
    assert (issued["lengths"].numpy() > plain_len).any()          # unique_head did lengthen some
    before = {(tuple(c[:n]), tuple(c[:m])) for c, n, m in
              zip(issued["codes"].tolist(), plain_len, issued["lengths"].tolist()) if m > n}
    tail_sids = set(sid_tuples(table.loc[~head_mask, "codes"]))
    for short, long in prefix_pairs(sid_tuples(table["codes"])):
        assert short in tail_sids and (short, long) in before, (short, long)


# ---- stability of issued head SIDs ----------------------------------------------------------

def _copy_run(params: dict, dest: Path) -> dict:
    """The run's inputs and tokenizers in a fresh out_dir (no sids/ yet)."""
    src = Path(params["out_dir"])
    for part in ("prepared", "embeddings", "tokenizer"):
        shutil.copytree(src / part, dest / part)
    return {**params, "out_dir": str(dest)}


def test_head_rows_are_the_registry_even_where_stage2_would_encode_otherwise(unique_run, tmp_path, monkeypatch):
    params, items, x, table = unique_run
    head_mask = (items["group"] == "head").to_numpy()
    issued = load_checkpoint(Path(params["out_dir"]) / "tokenizer" / "head.pt")["issued"]
    registry = dict(zip(issued["item_ids"], sid_tuples(issued_table(issued, "v")["codes"])))
    written = dict(zip(table["item_id"], sid_tuples(table["codes"])))
    assert {i: written[i] for i in registry} == registry
    # not vacuous: the full Stage-2 codebook (anchors + extensions) encodes some head items otherwise
    tok = load_tokenizer(params)
    codes, lengths = tok.assign(x[head_mask])
    lengths = unique_floor(codes, lengths, tok.max_len)
    reencoded = [tuple(c[:n]) for c, n in zip(codes.tolist(), lengths)]
    assert sum(r != registry[i] for r, i in zip(reencoded, items.loc[head_mask, "item_id"])) > 0
    # and the comparison above catches an assign_ids that bypasses the registry
    def bypass(head, item_ids, codes, lengths):   # marks the head rows but keeps the Stage-2 codes
        return np.isin(np.asarray(item_ids), head["issued"]["item_ids"])

    monkeypatch.setattr(stages, "_issued_head", bypass)
    other = _copy_run(params, tmp_path)
    stages.run_assign_ids(other)
    bypassed = read_sid_table(tmp_path / "sids" / "sid_table.parquet")
    assert dict(zip(bypassed["item_id"], sid_tuples(bypassed["codes"]))) != written
    assert {i: s for i, s in zip(bypassed["item_id"], sid_tuples(bypassed["codes"])) if i in registry} != registry


def test_reencoding_respects_unique_head_lengthening(unique_run):
    params, items, x, _ = unique_run
    issued = load_checkpoint(Path(params["out_dir"]) / "tokenizer" / "head.pt")["issued"]
    tok = load_tokenizer(params)
    ids = items["item_id"].tolist()
    registry = issued_table(issued, tok.version)
    assert reencoded_issued(tok, issued, ids, x, True, tok.version)["codes"].tolist() == registry["codes"].tolist()
    # without the lengthening the plain SIDs differ: the check would be wrong to ignore it
    assert reencoded_issued(tok, issued, ids, x, False, tok.version)["codes"].tolist() != registry["codes"].tolist()
    # the anchor part alone is what Stage 1 issued from: full-depth codes are bit-identical
    codes, _ = anchor_tokenizer(tok).assign(x[(items["group"] == "head").to_numpy()])
    assert np.array_equal(codes, issued["codes"].numpy())


def _swap_anchor_rows(tokenizer_state: dict, layer: int, a: int, b: int) -> None:
    """Swap two anchor rows of a saved tokenizer (its quantizer and its model's copy)."""
    blocks = {id(t): t for t in (tokenizer_state["quantizer"]["anchors"][layer],
                                 tokenizer_state["model"]["quantizer"]["anchors"][layer])}
    for rows in blocks.values():
        rows[[a, b]] = rows[[b, a]]


def test_stability_check_fails_when_stage2_anchors_moved(unique_run, tmp_path):
    params, items, x, _ = unique_run
    other = _copy_run(params, tmp_path)
    issued = load_checkpoint(tmp_path / "tokenizer" / "head.pt")["issued"]
    first = issued["codes"][:, 0].numpy()
    a, b = np.bincount(first).argsort()[::-1][:2]                  # the two layer-1 rows most head items use
    tail = load_checkpoint(tmp_path / "tokenizer" / "tail.pt")
    _swap_anchor_rows(tail["tokenizer"], 0, int(a), int(b))
    save_checkpoint(tail, tmp_path / "tokenizer" / "tail.pt")
    moved = {i for i, c in zip(issued["item_ids"], first) if c in (a, b)}
    assert moved
    with pytest.raises(DataError, match=f"{len(moved)} issued head SIDs are not what the Stage-2") as exc:
        stages.run_assign_ids(other)
    ids = items["item_id"].tolist()
    assert exc.value.column == "codes" and exc.value.rows == sorted(ids.index(i) for i in moved)[:5]
    assert not (tmp_path / "sids" / "sid_table.parquet").exists()


def test_stability_check_fails_when_the_registry_is_edited(unique_run, tmp_path):
    params, items, _, _ = unique_run
    other = _copy_run(params, tmp_path)
    head = load_checkpoint(tmp_path / "tokenizer" / "head.pt")
    k = 7
    item = head["issued"]["item_ids"][k]
    head["issued"]["codes"][k, 0] = (head["issued"]["codes"][k, 0] + 1) % 4
    save_checkpoint(head, tmp_path / "tokenizer" / "head.pt")
    with pytest.raises(DataError, match=rf"1 issued head SIDs .* \['{item}'\]") as exc:
        stages.run_assign_ids(other)
    assert exc.value.rows == [items["item_id"].tolist().index(item)]


# ---- ACRQ gradient isolation ----------------------------------------------------------------

@pytest.fixture(scope="module")
def stage2_model():
    """A Stage-2 model (anchors + k-means extensions) whose anchors are trainable parameters,
    with a frozen head table so some items stop before the last layer."""
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(160, 12), dim=1)
    head = RQVAE(12, [16], 6, ResidualQuantizer([4, 8], 6))
    fit(head, x[:40], TrainSpec(epochs=2, batch_size=16, lr=1e-2, beta=0.25, reseed_every=1, seed=0), None,
        init_kmeans=True, progress=False)
    table = PathTable.build(head.quantizer(head.encoder(x[:40])).codes, head.quantizer.sizes, 1.0)
    return head, table, x[40:]


def _trainable_anchors(head: RQVAE, table: PathTable, x: torch.Tensor) -> RQVAE:
    model = anchored_model(head, [3, 3])
    with torch.no_grad():
        init_rows_kmeans(model.quantizer, model.encoder(x), seed=0, niter=5)
    for layer in range(model.quantizer.n_layers):   # what a careless refactor might do
        setattr(model.quantizer, f"anchor_{layer}", torch.nn.Parameter(model.quantizer.anchor(layer).clone()))
    model.spec = TrainSpec(epochs=1, batch_size=16, lr=1e-2, beta=0.25, reseed_every=0, seed=0)
    model.sarq = SarqSpec(tau=2.0, min_len=1, max_len=2, smoothing=1.0, frozen_table=table)
    model.table = table
    return model


def test_gradient_reaches_used_extension_rows_and_never_anchor_rows(stage2_model):
    head, table, x = stage2_model
    model = _trainable_anchors(head, table, x)
    q = model.quantizer
    assert all(isinstance(q.anchor(l), torch.nn.Parameter) and q.anchor(l).requires_grad for l in range(2))
    model.losses(x)["loss"].backward()
    with torch.no_grad():
        out = q(model.encoder(x))
        depth = model.depths(out.codes)
    assert (depth < 2).any() and (depth == 2).any()               # the depth mask matters here
    for layer in range(2):
        a = q.anchor_sizes[layer]
        within = depth > layer
        used_ext = set((out.codes[within & out.trainable[:, layer], layer] - a).tolist())
        beyond = set((out.codes[~within & out.trainable[:, layer], layer] - a).tolist()) - used_ext
        assert used_ext and (out.codes[within, layer] < a).any()   # both kinds of rows are chosen
        assert q.anchor(layer).grad is None
        grad_rows = set(torch.nonzero(q.ext[layer].grad.abs().sum(1) > 0).flatten().tolist())
        assert grad_rows == used_ext, (layer, grad_rows, used_ext, beyond)
    assert all(p.grad is None for p in [*model.encoder.parameters(), *model.decoder.parameters()])


@pytest.mark.parametrize("how", ["adamw", "fit"])
def test_trainable_anchors_stay_bit_identical_through_training(stage2_model, how):
    """Weight decay moves any parameter that has a gradient, even an all-zero one: the
    anchors must get none. `fit` puts every requires_grad parameter in its Adam."""
    head, table, x = stage2_model
    model = _trainable_anchors(head, table, x)
    q = model.quantizer
    anchors = [q.anchor(l).detach().clone() for l in range(2)]
    ext = [e.detach().clone() for e in q.ext]
    if how == "adamw":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
        for _ in range(3):
            opt.zero_grad()
            model.losses(x)["loss"].backward()
            opt.step()
    else:
        fit(model, x, TrainSpec(epochs=2, batch_size=16, lr=1e-2, beta=0.25, reseed_every=0, seed=0),
            SarqSpec(tau=2.0, min_len=1, max_len=2, smoothing=1.0, frozen_table=table), init_kmeans=False,
            progress=False)
    for layer in range(2):
        assert torch.equal(q.anchor(layer).detach(), anchors[layer])
        assert not torch.equal(q.ext[layer].detach(), ext[layer])

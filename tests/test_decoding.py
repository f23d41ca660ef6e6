"""Constrained / unconstrained beam search, the SID trie and the SID -> items expansion."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import plain_retriever
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.retrieval.constrained_decoding import SidTrie, beam_search
from components.retrieval.retrieve import ranked_from_beams
from components.retrieval.retriever import RetrieverModel, decode, model_config
from components.tokenizers.sid_vocab import END, SidCatalog, SidVocab, pad_codes


class HashDecoder:
    """A stand-in model: log-probs are a fixed pseudo-random function of (prefix, column).

    The same function scores SIDs by brute force, so beam search can be checked exactly.
    """

    def __init__(self, vocab: SidVocab, seed: int):
        self.vocab, self.seed = vocab, seed

    def logits(self, prefix: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """prefix (..., t) tokens -> logits (..., len(columns))."""
        weights = torch.tensor([7.31, 3.17, 5.53, 2.29, 1.91])[: prefix.shape[-1]]
        h = (prefix.double() * weights).sum(-1, keepdim=True) + self.seed * 0.917
        return 3 * torch.sin(h * 1.37 + columns.double() * 2.11 + h * columns.double() * 0.13).float()

    def start(self, batch: dict) -> dict:
        return {"prefix": torch.zeros(batch["x"].shape[0], 1, 0, dtype=torch.long)}

    def step(self, state: dict, tokens: torch.Tensor, depth: int, columns: torch.Tensor) -> torch.Tensor:
        state["prefix"] = torch.cat([state["prefix"], tokens.unsqueeze(-1)], dim=2)
        logits = self.logits(state["prefix"], columns)
        if depth == 0:
            logits[..., -1] = float("-inf")
        return logits.log_softmax(-1)

    def reorder(self, state: dict, index: torch.Tensor) -> dict:
        state["prefix"] = state["prefix"][torch.arange(index.shape[0])[:, None], index]
        return state

    def score(self, sid: tuple[int, ...]) -> float:
        """Brute-force summed log-prob of a complete SID (END implied at full length)."""
        tokens, total = [1], 0.0
        for depth in range(self.vocab.max_len):
            columns = torch.from_numpy(self.vocab.layer_columns(depth))
            logits = self.logits(torch.tensor(tokens), columns)
            if depth == 0:
                logits[-1] = float("-inf")
            logp = logits.log_softmax(-1)
            if depth == len(sid):
                return total + float(logp[-1])
            total += float(logp[sid[depth]])
            tokens.append(self.vocab.offsets[depth] + sid[depth])
        return total


@st.composite
def sid_sets(draw):
    """Random codebooks and variable-length SID sets; often some SIDs are prefixes of others."""
    sizes = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    sid = st.integers(1, len(sizes)).flatmap(
        lambda n: st.tuples(*(st.integers(0, sizes[t] - 1) for t in range(n))))
    sids = draw(st.lists(sid, min_size=1, max_size=25, unique=True))
    if draw(st.booleans()):
        longest = max(sids, key=len)
        sids = sorted(set(sids) | {longest[:k] for k in range(1, len(longest) + 1)})
    return sizes, sids


def _trie(sizes, sids):
    codes, lengths = pad_codes([list(s) for s in sids], len(sizes))
    return SidTrie.build(codes, lengths, sizes)


def _batch(n: int) -> dict:
    return {"kind": "text", "x": torch.zeros(n, 1, 4), "mask": torch.ones(n, 1, dtype=torch.bool)}


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(sid_sets(), st.integers(1, 30), st.integers(0, 3))
def test_constrained_beams_are_issued_sorted_distinct_and_scored_right(data, beam, seed):
    sizes, sids = data
    vocab = SidVocab(sizes)
    model = HashDecoder(vocab, seed)
    res = beam_search(model, _batch(2), vocab, beam, _trie(sizes, sids))
    got, scores = res.to_lists()
    brute = {s: model.score(s) for s in sids}
    for q in range(2):
        assert set(got[q]) <= set(sids)
        assert len(got[q]) == len(set(got[q])) == min(beam, len(sids))
        assert all(a >= b for a, b in zip(scores[q], scores[q][1:]))
        for sid, sc in zip(got[q], scores[q]):
            assert sc == pytest.approx(brute[sid], abs=1e-4)
            assert sids[int(res.sid_index[q, got[q].index(sid)])] == sid
        if beam >= len(sids):  # nothing is pruned: the search is exact
            best = sorted(brute.values(), reverse=True)
            assert scores[q] == pytest.approx(best, abs=1e-4)


@settings(max_examples=25, deadline=None, database=None)
@given(st.lists(st.integers(1, 3), min_size=1, max_size=3), st.integers(1, 80), st.integers(0, 3))
def test_unconstrained_beams_are_well_formed(sizes, beam, seed):
    sizes = tuple(sizes)
    vocab = SidVocab(sizes)
    model = HashDecoder(vocab, seed)
    got, scores = beam_search(model, _batch(1), vocab, beam, None).to_lists()
    every = [s for n in range(1, len(sizes) + 1) for s in itertools.product(*(range(k) for k in sizes[:n]))]
    assert set(got[0]) <= set(every)
    assert len(got[0]) == len(set(got[0])) == min(beam, len(every))
    assert all(a >= b for a, b in zip(scores[0], scores[0][1:]))
    if beam >= len(every):
        assert sorted(got[0]) == sorted(every)


def test_trie_tables_encode_children_and_ends():
    sizes = (2, 3, 2)
    sids = [(0,), (0, 2), (1, 0, 1), (0, 2, 0)]
    trie = _trie(sizes, sids)
    root = trie.tables[0]
    assert root.shape == (2, 3)                      # root + sink, 2 codes + END
    assert root[0, 2] == -1 and root[0, 0] >= 0 and root[0, 1] >= 0
    n0 = int(root[0, 0])
    assert trie.tables[1][n0, 3] == sids.index((0,))  # (0,) ends here
    n02 = int(trie.tables[1][n0, 2])
    assert trie.tables[2][n02, 2] == sids.index((0, 2))
    assert trie.tables[2][n02, 0] >= 0 and trie.tables[2][n02, 1] == -1
    assert (trie.tables[1][-1] == -1).all()          # sink row


def _tiny_model(sizes=(4, 5, 3), seed=0, backbone: str = "small") -> RetrieverModel:
    """Both step decoders (ours with its KV cache; T5 with the Hugging Face cache) on tiny sizes."""
    torch.manual_seed(seed)
    rp = {"backbone": backbone, "d_model": 16, "n_heads": 2, "n_layers": 1, "ff_dim": 32, "dropout": 0.0,
          "n_memory": 2}
    return RetrieverModel(model_config(plain_retriever(**rp), sizes, 8, 6)).eval()


def _catalog(n_items: int, sizes, seed: int) -> SidCatalog:
    rng = np.random.default_rng(seed)
    codes = [list(rng.integers(0, sizes[: int(rng.integers(1, len(sizes) + 1))])) for _ in range(n_items)]
    return SidCatalog.build(np.array([f"i{j}" for j in range(n_items)]), rng.integers(0, 5, n_items), codes, len(sizes))


@pytest.mark.parametrize("backbone", ["small", "t5"])
def test_batched_and_one_by_one_decoding_agree(backbone):
    net = _tiny_model(backbone=backbone)
    net.attach_catalog(_catalog(40, (4, 5, 3), 1))
    rng = np.random.default_rng(0)
    lengths = [1, 3, 6, 2, 4]
    x = torch.from_numpy(rng.normal(size=(5, 6, 8)).astype(np.float32))
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    batch = {"kind": "history", "x": x, "mask": mask}
    together = decode(net, batch, beam=12)
    for q, n in enumerate(lengths):
        alone = decode(net, {"kind": "history", "x": x[q: q + 1, :n], "mask": mask[q: q + 1, :n]}, beam=12)
        assert torch.equal(alone.sid_index[0], together.sid_index[q])
        torch.testing.assert_close(alone.scores[0], together.scores[q], atol=1e-5, rtol=0)
    text = {"kind": "text", "x": x[:, :1], "mask": torch.ones(5, 1, dtype=torch.bool)}
    both = decode(net, text, beam=7)
    one = decode(net, {"kind": "text", "x": x[3:4, :1], "mask": torch.ones(1, 1, dtype=torch.bool)}, beam=7)
    assert torch.equal(both.sid_index[3], one.sid_index[0])


@pytest.mark.parametrize("backbone", ["small", "t5"])
def test_model_decoding_matches_teacher_forced_scores(backbone):
    """The KV-cached step decoder and the teacher-forced forward agree on every SID's score."""
    sizes = (4, 5, 3)
    net = _tiny_model(sizes, seed=3, backbone=backbone)
    cat = _catalog(30, sizes, 2)
    net.attach_catalog(cat)
    x = torch.from_numpy(np.random.default_rng(5).normal(size=(1, 3, 8)).astype(np.float32))
    batch = {"kind": "history", "x": x, "mask": torch.ones(1, 3, dtype=torch.bool)}
    res = decode(net, batch, beam=cat.n_sids)
    vocab = net.vocab
    codes, lengths = pad_codes([list(cat.sid_tuple(s)) for s in res.sid_index[0].tolist()], 3)
    dec_in, target = vocab.encode(codes, lengths)
    n = len(codes)
    with torch.no_grad():
        logp = net({**{k: v.expand(n, *v.shape[1:]) for k, v in batch.items() if k != "kind"}, "kind": "history",
                    "dec_in": torch.from_numpy(dec_in)}).log_softmax(-1)
    tgt = torch.from_numpy(target)
    tf = torch.where(tgt > 0, logp.gather(2, tgt.unsqueeze(-1)).squeeze(-1), 0.0).sum(1)
    torch.testing.assert_close(tf, res.scores[0], atol=1e-4, rtol=0)
    assert (tgt == END).sum() == int((lengths < 3).sum())


def test_ranked_expansion_orders_groups_by_popularity_then_id():
    ids = np.array(["b", "a", "c", "d", "e"])
    cat = SidCatalog.build(ids, np.array([1, 1, 5, 0, 2]), [[0, 1], [0, 1], [0, 1], [2], [1, 1]], 2)
    s01, s2, s11 = (cat.find(np.array([c]), np.array([n]))[0] for c, n in (([0, 1], 2), ([2, -1], 1), ([1, 1], 2)))
    sid_index = np.array([[s2, s01, -1], [s11, s2, s01]])
    scores = np.array([[-0.1, -0.5, -np.inf], [-0.2, -0.3, -0.9]], dtype=np.float32)
    frame = ranked_from_beams(np.array(["q1", "q2"]), sid_index, scores, cat)
    q1 = frame[frame.query_id == "q1"]
    assert q1.item_id.tolist() == ["d", "c", "a", "b"]     # SID (2,), then (0,1) by popularity, then id
    assert q1["rank"].tolist() == [0, 1, 2, 3]
    assert q1.sid.tolist() == ["2", "0-1", "0-1", "0-1"]
    assert frame[frame.query_id == "q2"].item_id.tolist() == ["e", "d", "c", "a", "b"]
    targets = np.array([[2, 0], [1, 3]])
    ranks = cat.target_ranks(sid_index, targets)
    expect = frame.set_index(["query_id", "item_id"])["rank"]
    assert ranks.tolist() == [[expect["q1", "c"], expect["q1", "b"]], [expect["q2", "a"], expect["q2", "d"]]]
    assert cat.find(np.array([[3, 0], [0, 1]]), np.array([2, 1]))[0] == -1
    # similarity order inside a SID: the item closest to the query first, whatever its popularity
    item_vecs = np.eye(5, dtype=np.float32)
    query_vecs = np.array([[0, 1, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=np.float32)   # q1 is close to "a"
    sim = ranked_from_beams(np.array(["q1", "q2"]), sid_index, scores, cat, query_vecs, item_vecs)
    assert sim[sim.query_id == "q1"].item_id.tolist() == ["d", "a", "c", "b"]
    assert sim[["query_id", "rank", "sid", "score"]].equals(frame[["query_id", "rank", "sid", "score"]])


def test_catalog_groups_collisions_and_finds_sids():
    cat = _catalog(60, (3, 3, 2), 4)
    assert cat.group_sizes().sum() == 60
    found = cat.find(cat.codes, cat.lengths)
    assert (found == np.arange(cat.n_sids)).all()
    frame = pd.DataFrame({"sid": cat.item_sid, "pos": cat.item_pos})
    assert (frame.groupby("sid")["pos"].apply(lambda p: sorted(p) == list(range(len(p))))).all()

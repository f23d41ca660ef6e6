"""Item-level retrieval metrics (Recall/MRR/NDCG@K, Ret-Per, hallucination) with bootstrap CIs.

Every method hands over a ranked-results frame (query_id, rank, item_id, score, sid) whose
`rank` is the 0-based *item* rank: a SID at beam rank r holding m items already occupies m
consecutive item ranks there, so cutting at K counts items, not SIDs.

Rules (also in the report):
- A query with several targets (climate-fever) has recall@K = share of its targets found in the
  top K; MRR@K uses the first target found; NDCG@K uses binary gains with the ideal DCG of
  min(n_targets, K) hits.
- Groups: a query counts in the group of every one of its targets; inside group g only its
  targets of group g are relevant. With one target per query this is the plain split by the
  target's group.
- Ret-Per = items returned per query. Hallucination = per query, the share of generated SIDs
  that match no item; its mean over queries is reported, over all B beams (`hallucination`,
  the paper's "Hallu"), over the top k beams (`hallucination@k`), and divided by the rate of
  random SIDs of the same lengths (`hallucination_norm`; see `hallucination_table`).
- 95% intervals: percentile bootstrap over queries (within each group), fixed seed.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from components.runtime.errors import DataError

GROUPS: tuple[str, ...] = ("head", "tail", "cold")
RANKED_COLUMNS: tuple[str, ...] = ("query_id", "rank", "item_id", "score", "sid")


def check_ranked(ranked: pd.DataFrame, source: str = "ranked results") -> None:
    """Reject a ranked frame that breaks the contract, naming the first offending rows."""
    missing = [c for c in RANKED_COLUMNS if c not in ranked.columns]
    if missing:
        raise DataError(source, f"missing columns {missing}; have {list(ranked.columns)}", column=missing[0])
    negative = ranked.index[ranked["rank"] < 0]
    if len(negative):
        raise DataError(source, "rank must be >= 0", column="rank", rows=negative)
    dup = ranked.duplicated(["query_id", "rank"], keep="first")
    if dup.any():
        raise DataError(source, "two rows share one (query_id, rank)", column="rank", rows=ranked.index[dup])


def target_pairs(queries: pd.DataFrame, items: pd.DataFrame, source: str = "prepared/queries.parquet") -> pd.DataFrame:
    """One row per (query, target item) with the target's group and popularity.

    DataError rows are the queries frame's index labels (file row positions when read from parquet).
    """
    pairs = queries[["query_id", "targets"]].explode("targets").rename(columns={"targets": "item_id"})
    empty = pairs["item_id"].isna()
    if empty.any():
        raise DataError(source, "every query needs at least one target", column="targets",
                        rows=pairs.index[empty].unique())
    info = items.set_index("item_id")[["group", "popularity"]]
    unknown = ~pairs["item_id"].isin(info.index)
    if unknown.any():
        first = pairs.loc[unknown, "item_id"].iloc[0]
        raise DataError(source, f"target {first!r} is not in prepared/items.parquet", column="targets",
                        rows=pairs.index[unknown].unique())
    pairs = pairs.drop_duplicates(["query_id", "item_id"]).reset_index(drop=True)
    return pairs.join(info, on="item_id")


def target_ranks(ranked: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """`pairs` plus the item rank at which each target was returned (inf when not returned).

    Only the ranked rows that hold a target are grouped, so deep result lists stay cheap.
    """
    queries = pd.Index(pairs["query_id"].unique())
    items = pd.Index(pairs["item_id"].unique())
    ranked_key = _pair_keys(queries, items, ranked["query_id"], ranked["item_id"])
    hit = ranked_key >= 0
    ranked_key = ranked_key[hit]
    pair_key = _pair_keys(queries, items, pairs["query_id"], pairs["item_id"])
    best = pd.Series(ranked["rank"].to_numpy()[hit], dtype=float).groupby(ranked_key).min()
    out = pairs.copy()
    out["rank"] = best.reindex(pair_key).fillna(np.inf).to_numpy()
    return out


def _pair_keys(q_index: pd.Index, i_index: pd.Index, query_ids: pd.Series, item_ids: pd.Series) -> np.ndarray:
    """One int64 per (query, item) pair; -1 where either is outside the indexes."""
    q, i = q_index.get_indexer(query_ids), i_index.get_indexer(item_ids)
    return np.where((q >= 0) & (i >= 0), q.astype(np.int64) * len(i_index) + i, -1)


def drop_history_items(ranked: pd.DataFrame, queries: pd.DataFrame, depth: int | None = None) -> pd.DataFrame:
    """Remove each query's own history items from its ranking and close the rank gaps.

    The "filter seen items" protocol (eval.exclude_history); `depth` then cuts each list again.
    """
    hist = queries[["query_id", "history"]].explode("history").dropna()
    q_index, i_index = pd.Index(hist["query_id"].unique()), pd.Index(hist["history"].unique())
    seen = np.unique(_pair_keys(q_index, i_index, hist["query_id"], hist["history"]))
    keys = _pair_keys(q_index, i_index, ranked["query_id"], ranked["item_id"])
    out = ranked[~np.isin(keys, seen)].sort_values("rank", kind="stable")
    out = out.assign(rank=out.groupby("query_id", sort=False).cumcount().astype(np.int64)).sort_index()
    return out[out["rank"] < depth].reset_index(drop=True) if depth is not None else out.reset_index(drop=True)


def _ideal_dcg(n_rel: np.ndarray, k: int) -> np.ndarray:
    cum = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))])
    return cum[np.minimum(n_rel, k)]


def per_query_metrics(ranks: pd.DataFrame, ks: list[int], deep_ks: list[int] | None = None) -> pd.DataFrame:
    """Per-query recall@K (ks + deep_ks), MRR@K, NDCG@K (ks) and recall@all, indexed by query_id."""
    q = ranks["query_id"].to_numpy()
    r = ranks["rank"].to_numpy(dtype=float)
    codes, uniq = pd.factorize(q, sort=True)
    n = len(uniq)
    n_rel = np.bincount(codes, minlength=n)
    first = np.full(n, np.inf)
    np.minimum.at(first, codes, r)
    cols: dict[str, np.ndarray] = {}
    for k in sorted(set(ks) | set(deep_ks or [])):
        cols[f"recall@{k}"] = np.bincount(codes, weights=(r < k).astype(float), minlength=n) / n_rel
    for k in sorted(set(ks)):
        cols[f"mrr@{k}"] = np.where(first < k, 1.0 / (first + 1.0), 0.0)
        gain = np.where(r < k, 1.0 / np.log2(np.where(np.isfinite(r), r, 0.0) + 2.0), 0.0)
        cols[f"ndcg@{k}"] = np.bincount(codes, weights=gain, minlength=n) / _ideal_dcg(n_rel, k)
    cols["recall@all"] = np.bincount(codes, weights=np.isfinite(r).astype(float), minlength=n) / n_rel
    return pd.DataFrame(cols, index=pd.Index(uniq, name="query_id"))


def ret_per_query(ranked: pd.DataFrame, query_ids: pd.Index) -> pd.Series:
    """Number of distinct items returned per query (0 for a query with no rows)."""
    counts = ranked.drop_duplicates(["query_id", "item_id"])["query_id"].value_counts()
    return counts.reindex(query_ids, fill_value=0).astype(float).rename("ret_per")


def hallucination_per_query(generated: pd.DataFrame, k: int | None = None) -> pd.Series:
    """Share of a query's generated SIDs that no item holds (over its first `k` beams when given).

    `generated`: one row per (query_id, decoded SID) from unconstrained decoding, with
    `beam_rank` and `sid_index` = -1 where the SID was never issued (components.retrieval.retrieve.generate).
    """
    if k is not None:
        generated = top_beams(generated, k)
    name = "hallucination" if k is None else f"hallucination@{k}"
    return (generated["sid_index"] < 0).astype(float).groupby(generated["query_id"]).mean().rename(name)


def top_beams(generated: pd.DataFrame, k: int) -> pd.DataFrame:
    """Each query's first `k` decoded SIDs by beam_rank (beams that decoded nothing have no row)."""
    order = generated.sort_values(["query_id", "beam_rank"], kind="stable")
    return order[order.groupby("query_id", sort=False).cumcount().to_numpy() < k]


# ---- the SID space: what a uniformly random SID of the decoder's vocabulary would hit -------

def issued_by_length(codes: Iterable[Sequence[int]]) -> dict[int, int]:
    """Distinct issued SIDs per length, from the `codes` column of a sid_table (items sharing a SID count once)."""
    distinct = {tuple(int(c) for c in row) for row in codes}
    out: dict[int, int] = {}
    for sid in distinct:
        out[len(sid)] = out.get(len(sid), 0) + 1
    return dict(sorted(out.items()))


def sid_space(codebook_sizes: Sequence[int], lengths: Iterable[int] | None = None) -> int:
    """Token sequences the unconstrained decoder can emit with a length in `lengths`.

    Its per-depth mask (components.tokenizers.sid_vocab.SidVocab.layer_mask) allows at depth t the K_t
    codes of layer t, and END from depth 1 on, whatever the tokenizer's min_len: so a length-L
    SID is any of K_1 * ... * K_L sequences, and the whole space is the sum over L = 1..max_len
    (default `lengths`). With TIGER's collision token the collision layer is the last layer of
    codebook_sizes (sids/meta.json) and counts like any other.
    """
    sizes = [int(k) for k in codebook_sizes]
    lengths = range(1, len(sizes) + 1) if lengths is None else lengths
    bad = [int(n) for n in lengths if not 1 <= int(n) <= len(sizes)]
    if bad:
        raise ValueError(f"SID lengths {bad} outside 1..{len(sizes)} (codebook_sizes {sizes})")
    return sum(math.prod(sizes[: int(n)]) for n in lengths)


def chance_hallucination(codebook_sizes: Sequence[int], issued: Mapping[int, int],
                         lengths: Iterable[int] | None = None) -> float:
    """Hallucination rate of a uniformly random SID among the sequences of the lengths in `lengths`.

    = 1 - (issued SIDs of those lengths) / sid_space(codebook_sizes, lengths); `issued` maps a
    length to its number of distinct issued SIDs (issued_by_length). With every length
    (the default) this is the chance rate of the decoder's whole output space; with one length
    L it is the chance rate at L, which `hallucination_table` uses.
    """
    lengths = list(range(1, len(codebook_sizes) + 1) if lengths is None else lengths)
    space = sid_space(codebook_sizes, lengths)
    hit = sum(int(issued.get(int(n), 0)) for n in set(int(n) for n in lengths))
    if hit > space:
        raise ValueError(f"{hit} issued SIDs of lengths {sorted(set(lengths))} but only {space} sequences")
    return 1.0 - hit / space


def chance_by_length(codebook_sizes: Sequence[int], issued: Mapping[int, int]) -> np.ndarray:
    """Chance hallucination rate at each length: entry L-1 = chance_hallucination(..., lengths=[L])."""
    return np.array([chance_hallucination(codebook_sizes, issued, [n]) for n in range(1, len(codebook_sizes) + 1)])


def hallucination_table(generated: pd.DataFrame, k: int, codebook_sizes: Sequence[int],
                        issued: Mapping[int, int]) -> pd.DataFrame:
    """Per-query hallucination three ways, indexed by query_id (the unconstrained row's metrics).

    - `hallucination`: share of all B decoded SIDs that no item holds (the paper's "Hallu").
    - `hallucination@k`: the same over the first k beams by beam_rank (k = eval.headline_k).
      With B = 100 a retriever is made to emit 100 distinct SIDs although only a few real
      ones lie near a query; the top k are the ones that fill Recall@k.
    - `hallucination_norm`: observed / chance over all B beams, where chance is what SIDs drawn
      uniformly at random *at the lengths the decoder chose* would score: a beam of length L
      has chance c_L = 1 - issued_L / (K_1 * ... * K_L) (chance_by_length), and per query
        hallucination_norm = #hallucinated beams / sum over its beams of c_{L_b}.
      1.0 = no better than a uniformly random SID of the same length; lower is better; above 1
      = worse than random. Where every beam sits at a length whose whole space is issued
      (c = 0, so nothing could be hallucinated) the query counts as 1.0: chance did as well.
      Why length-matched: a short SID lives in a small space that issued SIDs can fill (one
      SA2CRQ run issues 17% of all length-2 sequences of its 80 x 160 codebooks), so short
      SIDs lower the raw rate by construction; dividing by c_L removes that, and leaves the
      model's choice of codes given the length. The chance rate of the whole output space (chance_hallucination
      with every length, i.e. 1 - issued / sum_L prod K) is >= 0.998 for every tokenizer in the
      amazon-scientific and climate-fever comparisons, so dividing by it would leave the raw
      rate unchanged and compare nothing.
    """
    lengths = generated["sid"].astype(str).str.count("-").to_numpy() + 1
    chance = chance_by_length(codebook_sizes, issued)
    if len(lengths) and lengths.max() > len(chance):
        raise ValueError(f"a generated SID has {lengths.max()} codes but codebook_sizes has {len(chance)} layers")
    miss = (generated["sid_index"].to_numpy() < 0).astype(float)
    frame = pd.DataFrame({"miss": miss, "chance": chance[lengths - 1] if len(lengths) else np.zeros(0)})
    sums = frame.groupby(generated["query_id"].to_numpy()).sum()
    norm = np.where(sums["chance"] > 0, sums["miss"] / sums["chance"].where(sums["chance"] > 0, 1.0), 1.0)
    out = pd.DataFrame({"hallucination": hallucination_per_query(generated),
                        f"hallucination@{k}": hallucination_per_query(generated, k)})
    out["hallucination_norm"] = pd.Series(norm, index=sums.index).reindex(out.index).to_numpy()
    return out.rename_axis("query_id")


def bootstrap_ci(values: np.ndarray, n_boot: int, seed: int, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap of column means over rows (queries); values is (n_queries, n_metrics).

    Resampling is done as multiplicity counts so that every metric sees the same resamples.
    """
    values = np.asarray(values, dtype=float)
    n, m = values.shape
    if n == 0 or n_boot <= 0:
        nan = np.full(m, np.nan)
        return nan, nan
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, m))
    chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b)[:, None] * n)
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)
        means[start:start + b] = counts @ values / n
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return lo, hi


def _summarise(table: pd.DataFrame, n_boot: int, seed: int) -> dict:
    if len(table) == 0:
        return {"n_queries": 0, "metrics": {c: {"mean": None, "lo": None, "hi": None} for c in table.columns}}
    out: dict[str, dict] = {}
    for cols in (list(table.columns[table.notna().all()]), list(table.columns[~table.notna().all()])):
        if not cols:
            continue
        sub = table[cols].dropna()
        lo, hi = bootstrap_ci(sub.to_numpy(), n_boot, seed)
        for c, mean, a, b in zip(cols, sub.mean().to_numpy(), lo, hi):
            out[c] = {"mean": float(mean), "lo": float(a), "hi": float(b)}
    return {"n_queries": int(len(table)), "metrics": {c: out[c] for c in table.columns}}


def evaluate_ranked(
    ranked: pd.DataFrame,
    queries: pd.DataFrame,
    items: pd.DataFrame,
    ks: list[int],
    deep_ks: list[int] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    hallucination: pd.Series | pd.DataFrame | None = None,
    source: str = "ranked results",
    budgets: list[int] | None = None,
) -> dict:
    """Metrics with 95% CIs for one method: {"overall"|"head"|"tail"|"cold": {n_queries, metrics}}.

    `budgets`: for each K, `reach@K`, the share of queries given at least K items (a row whose reach is
    below 1 could not fill the budget: its R@K is over what it returned).

    `hallucination`: optional per-query rates: a Series (hallucination_per_query), reported as
    `hallucination`, or a frame (hallucination_table) whose every column is reported.
    """
    check_ranked(ranked, source)
    pairs = target_ranks(ranked, target_pairs(queries, items))
    ret_per = ret_per_query(ranked, pd.Index(queries["query_id"]))
    result: dict[str, dict] = {}
    for group in ("overall",) + GROUPS:
        sub = pairs if group == "overall" else pairs[pairs["group"] == group]
        table = per_query_metrics(sub, ks, deep_ks)
        table["ret_per"] = ret_per.reindex(table.index).to_numpy()
        for k in budgets or []:
            table[f"reach@{k}"] = (table["ret_per"] >= k).astype(float)
        if hallucination is not None:
            rates = hallucination.rename("hallucination").to_frame() if isinstance(hallucination, pd.Series) \
                else hallucination
            for col in rates.columns:
                table[col] = rates[col].reindex(table.index).to_numpy()
        result[group] = _summarise(table, n_boot, seed)
    return result


def recall_by_popularity_decile(ranked: pd.DataFrame, queries: pd.DataFrame, items: pd.DataFrame,
                                k: int) -> pd.DataFrame:
    """Recall@k of (query, target) pairs by the target's catalog popularity decile (10 = most popular).

    Deciles split the catalog into ten equal item counts by popularity (ties by item_id), so cold
    items sit in the lowest deciles.
    """
    order = items.sort_values(["popularity", "item_id"], kind="stable")["item_id"].to_numpy()
    decile = pd.Series(np.arange(len(order)) * 10 // max(len(order), 1) + 1, index=order, name="decile")
    pairs = target_ranks(ranked, target_pairs(queries, items))
    pairs["decile"] = decile.reindex(pairs["item_id"]).to_numpy()
    pairs["hit"] = (pairs["rank"] < k).astype(float)
    out = pairs.groupby("decile").agg(recall=("hit", "mean"), n_pairs=("hit", "size"))
    return out.reindex(range(1, 11)).fillna({"n_pairs": 0}).reset_index()

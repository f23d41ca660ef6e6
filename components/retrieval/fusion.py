"""Hybrid ranking: the generated candidates fused with a dense ranking (LIGER's idea).

Why: a generative retriever only returns items inside the SIDs it decodes, so tail and cold
items the decoder never learned to emit cannot surface; a dense ranking reaches every item.
Weighted reciprocal-rank fusion needs no score calibration between a beam log-probability and a
cosine: score = sum over lists of w_list / (k + rank in the list), 1-based ranks, a list an item
is missing from adds nothing. The weights sum to 1; w_generated = 1 keeps the generative order.
The other lists are the retriever's learned item scorer (`learned`, components/retrieval/item_scorer.py),
the frozen text embeddings (`zero_shot`, the dense baseline's vectors) and BM25 over item text
(`bm25`, the BM25 baseline's index and query texts): lexical matches reach tail and cold items
that neither embedding ranks high. The weights are chosen on the validation split when the
retriever is trained (`choose_fusion`, a 0.1 grid over weights summing to 1, all sources at
once, for each reciprocal-rank constant listed), so the same rule carries over to any catalog: a search catalog with strong text matching
picks a low generated weight, a recommendation log with a sharp decoder a high one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from components.ranking.dense_index import DENSE_EXACT_UP_TO, ivf_index
from components.runtime.config_schema import fusion_sources, typed_params

STEP = 0.1  # weight grid step of the validation choice
TIE_DECIMALS = 9  # dense similarities equal to this many decimals are ties (float64 sums agree far beyond)


@dataclass
class Ranked:
    """Flat ranked lists: per query (in query order) its item rows best first, with scores."""

    items: np.ndarray      # (total,) item rows
    scores: np.ndarray     # (total,)
    per_query: np.ndarray  # (N,) list lengths

    @property
    def query(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.per_query)), self.per_query)

    @property
    def rank(self) -> np.ndarray:
        """0-based rank of each row inside its query's list."""
        return np.arange(len(self.items)) - np.repeat(np.cumsum(self.per_query) - self.per_query, self.per_query)

    def top(self, k: int) -> np.ndarray:
        """(N, k) item rows, -1 padded."""
        out = np.full((len(self.per_query), k), -1, dtype=np.int64)
        keep = self.rank < k
        out[self.query[keep], self.rank[keep]] = self.items[keep]
        return out


def fusion_config(params: dict) -> dict:
    """`retriever.fusion` as the fusion choice reads it (checked once by the schema): the sources resolved
    (`auto`: every registered source the retriever feeds; `none`: []), fixed weights normalised to sum 1,
    rrf_k as a list of the values to try, the objective as {K: weight}, and the depth raised to the deepest
    budget (eval.budgets, the objective's K): a fused list must reach every budget it is read to."""
    typed = typed_params(params)
    fu = typed.retriever.fusion
    weights = fu.weights if fu.weights == "auto" else [float(w) / sum(fu.weights) for w in fu.weights]
    objective = parse_objective(fu.objective)
    return {"sources": fusion_sources(params["retriever"]), "weights": weights,
            "depth": max(fu.depth, *typed.eval.budgets, *(objective if isinstance(objective, dict) else ())),
            "rrf_k": list(fu.rrf_k) if isinstance(fu.rrf_k, list) else [fu.rrf_k], "bm25_history": fu.bm25_history,
            "objective": objective, "use_generated": fu.use_generated}


def parse_objective(objective: dict[str, float] | str) -> Objective:
    """retriever.fusion.objective ({recall@10: 0.5, recall@500: 0.5}) as {K: weight}; "balanced" stays."""
    if objective == "balanced":
        return "balanced"
    return {int(key.split("@", 1)[1]): float(w) for key, w in objective.items()}


def weight_grid(n_lists: int, step: float = STEP) -> list[tuple[float, ...]]:
    """Every weight vector over n_lists lists on a `step` grid, summing to 1 (the generated list first)."""
    units = round(1 / step)

    def split(n: int, total: int):
        if n == 1:
            yield (total,)
            return
        for first in range(total, -1, -1):
            for rest in split(n - 1, total - first):
                yield (first,) + rest

    return [tuple(round(u * step, 4) for u in combo) for combo in split(n_lists, units)]


def dense_ranking(query_vecs: np.ndarray, item_vecs: np.ndarray, depth: int, chunk: int = 2048) -> Ranked:
    """Top-`depth` items per query by dot product (vectors are unit length: cosine), in query chunks.

    Similarities are computed in float64 and rounded to TIE_DECIMALS, so items whose scores are equal
    (a two-item history's mean is exactly as close to either item) rank by item row whatever the
    query's batch: float32 rounding depends on the batch's shape and would break such ties either way.
    Above DENSE_EXACT_UP_TO items a faiss IVF index answers instead (components/ranking/dense_index.py);
    a query whose probed cells hold fewer than `depth` items gets a shorter list."""
    n, depth = len(query_vecs), min(depth, len(item_vecs))
    if len(item_vecs) > DENSE_EXACT_UP_TO:
        rows, found = ivf_index(item_vecs).search(query_vecs, depth)
        keep = rows >= 0
        return Ranked(rows[keep].astype(np.int64), found[keep].astype(np.float32), keep.sum(1).astype(np.int64))
    rows = np.empty((n, depth), dtype=np.int64)
    scores = np.empty((n, depth), dtype=np.float32)
    items_t = item_vecs.astype(np.float64).T
    for s in range(0, n, chunk):
        sim = np.round(query_vecs[s: s + chunk].astype(np.float64) @ items_t, TIE_DECIMALS)
        part = np.argpartition(-sim, depth - 1, axis=1)[:, :depth] if depth < sim.shape[1] else \
            np.tile(np.arange(sim.shape[1]), (len(sim), 1))
        psim = np.take_along_axis(sim, part, 1)
        order = np.lexsort((part, -psim), axis=1)   # score desc, then item row: deterministic ties
        rows[s: s + chunk] = np.take_along_axis(part, order, 1)
        scores[s: s + chunk] = np.take_along_axis(psim, order, 1)
    return Ranked(rows.reshape(-1), scores.reshape(-1), np.full(n, depth, dtype=np.int64))


@dataclass
class HeldTargets:
    """Targets found in a fusion's union: their flat index into targets (N, T), their pair, their query's
    pairs (one row each, padded with a pair no list holds) and which of those come first on a score tie."""

    flat: np.ndarray
    pair: np.ndarray
    row_pairs: np.ndarray
    before: np.ndarray
    shape: tuple[int, int]


class FusionCandidates:
    """The union of several ranked lists' (query, item) pairs, built once, scored under any weights.

    Why: choosing the fusion tries hundreds of (weights, rrf_k) points on the same lists; the union,
    each pair's best generated rank and its slot per query do not depend on them, so only the scores
    and the order are recomputed per point, and `top` orders only the pairs that can reach the top k."""

    def __init__(self, lists: list[Ranked], n_items: int) -> None:
        never = np.iinfo(np.int64).max // 2
        q = np.concatenate([r.query for r in lists])
        key = q.astype(np.int64) * n_items + np.concatenate([r.items for r in lists])
        uniq, self.inv = np.unique(key, return_inverse=True)
        first_rank = np.concatenate([lists[0].rank] + [np.full(len(r.items), never) for r in lists[1:]])
        self.first = np.full(len(uniq), never, dtype=np.int64)
        np.minimum.at(self.first, self.inv, first_rank)
        self.uq, self.ui = uniq // n_items, uniq % n_items
        self.ranks = [r.rank for r in lists]
        self.n_queries = len(lists[0].per_query)
        self.per_query = np.bincount(self.uq, minlength=self.n_queries)
        self.slot = np.arange(len(uniq)) - (np.cumsum(self.per_query) - self.per_query)[self.uq]
        self.key, self.n_items = uniq, n_items

    def target_pairs(self, targets: np.ndarray) -> HeldTargets:
        """The targets some list holds, with their queries' pairs laid out once for target_ranks."""
        q, j = np.nonzero(targets >= 0)
        key = q.astype(np.int64) * self.n_items + targets[q, j]
        pos = np.minimum(np.searchsorted(self.key, key), max(len(self.key) - 1, 0))
        held = self.key[pos] == key if len(self.key) else np.zeros(len(key), bool)
        flat, pair = q[held] * targets.shape[1] + j[held], pos[held]
        width = int(self.per_query.max(initial=0))
        starts = (np.cumsum(self.per_query) - self.per_query)[self.uq[pair]]
        cols = np.arange(width)[None, :]
        inside = cols < self.per_query[self.uq[pair]][:, None]
        row_pairs = np.where(inside, starts[:, None] + cols, len(self.key))   # len(key): a pair no list holds
        first = np.append(self.first, np.iinfo(np.int64).max)[row_pairs]
        item = np.append(self.ui, np.iinfo(np.int64).max)[row_pairs]
        before = (first < self.first[pair][:, None]) | ((first == self.first[pair][:, None])
                                                         & (item < self.ui[pair][:, None]))
        return HeldTargets(flat, pair, row_pairs, before, targets.shape)

    def target_ranks(self, weights: list[float] | tuple[float, ...], rrf_k: int, held: HeldTargets) -> np.ndarray:
        """(N, T) 0-based rank of each target in the fused order (`fused`: score desc, then the generated rank,
        then item row), inf where no list holds it. Why: recall at any depth from one comparison per target
        against its query's pairs, where `top(k)` sorts every pair above the k-th score (seconds a point at
        k = 500 on amazon's validation queries)."""
        score = np.append(self.scores(weights, rrf_k), -np.inf)
        ranks = np.full(held.shape[0] * held.shape[1], np.inf)
        if len(held.pair):
            row, mine = score[held.row_pairs], score[held.pair][:, None]
            ranks[held.flat] = ((row > mine) | ((row == mine) & held.before)).sum(1)
        return ranks.reshape(held.shape)

    def scores(self, weights: list[float] | tuple[float, ...], rrf_k: int) -> np.ndarray:
        """Fused score of every pair: sum over lists of w / (rrf_k + 1-based rank)."""
        contrib = np.concatenate([w / (rrf_k + 1.0 + rank) for rank, w in zip(self.ranks, weights)])
        return np.bincount(self.inv, weights=contrib, minlength=len(self.uq))

    def _ordered(self, score: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Pairs `idx` by query, then score desc, then the generated rank, then item row."""
        return idx[np.lexsort((self.ui[idx], self.first[idx], -score[idx], self.uq[idx]))]

    def fused(self, weights: list[float] | tuple[float, ...], rrf_k: int) -> Ranked:
        score = self.scores(weights, rrf_k)
        order = self._ordered(score, np.arange(len(score)))
        return Ranked(self.ui[order], score[order].astype(np.float32), self.per_query)

    def top(self, weights: list[float] | tuple[float, ...], rrf_k: int, k: int) -> np.ndarray:
        """(N, k) item rows, -1 padded: `fused(...).top(k)` without sorting the pairs below each query's k-th score."""
        score = self.scores(weights, rrf_k)
        width = int(self.per_query.max(initial=0))
        out = np.full((self.n_queries, k), -1, dtype=np.int64)
        if width == 0:
            return out
        table = np.full((self.n_queries, width), -np.inf)
        table[self.uq, self.slot] = score
        kth = -np.partition(-table, min(k, width) - 1, axis=1)[:, min(k, width) - 1]
        order = self._ordered(score, np.flatnonzero(score >= kth[self.uq]))
        q = self.uq[order]
        counts = np.bincount(q, minlength=self.n_queries)
        pos = np.arange(len(order)) - (np.cumsum(counts) - counts)[q]
        keep = pos < k
        out[q[keep], pos[keep]] = self.ui[order[keep]]
        return out


def fuse(lists: list[Ranked], weights: list[float] | tuple[float, ...], rrf_k: int, n_items: int) -> Ranked:
    """Weighted reciprocal-rank fusion of ranked lists per query; ties follow the first list's rank, then item row.

    The first list is the generated one: an item it misses gets no share of its weight."""
    return FusionCandidates(lists, n_items).fused(weights, rrf_k)


def recall_of_top(top: np.ndarray, targets: np.ndarray) -> float:
    """Mean over queries with targets of the share of targets in `top` ((N, k) item rows; targets (N, T), -1 padded)."""
    valid = targets >= 0
    hit = (targets[:, :, None] == top[:, None, :]).any(2) & valid
    has = valid.any(1)
    return float((hit.sum(1)[has] / valid.sum(1)[has]).mean()) if has.any() else float("nan")


def recall_of_ranks(ranks: np.ndarray, targets: np.ndarray, k: int) -> float:
    """recall_of_top from each target's rank ((N, T), inf = not ranked): the share of targets ranked below k."""
    valid = targets >= 0
    has = valid.any(1)
    hit = (ranks < k) & valid
    return float((hit.sum(1)[has] / valid.sum(1)[has]).mean()) if has.any() else float("nan")


def recall_at(ranked: Ranked, targets: np.ndarray, k: int) -> float:
    """Mean over queries with targets of the share of targets in the top k (targets (N, T), -1 padded)."""
    return recall_of_top(ranked.top(k), targets)


Objective = dict[int, float] | str   # {K: weight}, or "balanced" (see score_points)


def score_points(tried: list[dict], objective: Objective, budgets: list[int]) -> None:
    """Set each grid point's "objective": the weighted sum of its Recall@K ({K: weight}), or for
    "balanced" the mean over `budgets` of its Recall@K relative to the best any point reaches at that K, so
    no budget's scale dominates and a point near the best at every depth wins (a rule with no weight to tune,
    which carries over to catalogs whose recall levels differ)."""
    if objective == "balanced":
        best = {k: max(t[f"recall@{k}"] for t in tried) for k in budgets}
        for t in tried:
            t["objective"] = float(np.mean([t[f"recall@{k}"] / best[k] if best[k] > 0 else 0.0 for k in budgets]))
        return
    for t in tried:
        t["objective"] = float(sum(w * t[f"recall@{k}"] for k, w in objective.items()))


def best_point(tried: list[dict]) -> dict:
    """The point with the best objective; ties go to the larger generated weight (without a gain the generated
    list stays alone), then to the point tried first (the constant listed first)."""
    return max(enumerate(tried), key=lambda it: (round(it[1]["objective"], 12), it[1]["weights"]["generated"],
                                                 -it[0]))[1]


def objective_choices(tried: list[dict], objectives: dict[str, Objective], budgets: list[int]) -> list[dict]:
    """For each named objective, the point it chooses from one grid and that point's recall at each budget:
    what choosing for one budget costs at the others (read back from metrics/retriever_train.json)."""
    rows = []
    for name, objective in objectives.items():
        points = [dict(t) for t in tried]
        score_points(points, objective, budgets)
        best = best_point(points)
        rows.append({"objective": name, "weights": best["weights"], "rrf_k": best["rrf_k"],
                     **{f"recall@{k}": best[f"recall@{k}"] for k in budgets}})
    return rows


def choose_fusion(generated: Ranked, dense: dict[str, Ranked], targets: np.ndarray, objective: int | Objective,
                  rrf_k: int | list[int], n_items: int, weights: list | None = None, with_generated: bool = True,
                  report: list[int] | None = None) -> tuple[list[float], int, list[dict]]:
    """Best weights (generated list first, then each other source) and reciprocal-rank constant by the
    validation objective (score_points): Recall@k (an int), a weighted sum of Recall@K ({10: 0.5, 500: 0.5}),
    or "balanced" over the `report` budgets (retriever.fusion.objective, for a list read to several depths).

    `weights` None = the whole grid (`weight_grid`), tried with every constant in `rrf_k`;
    `with_generated=False` keeps the generated weight at 0 (the ablation without generation). Ties go to
    the larger generated weight (without a gain the generated list stays alone), then to the constant
    listed first. Returns the weights, the constant and every point tried, with the recall at each of the
    objective's K and at each K of `report` (eval.budgets: what another objective would have chosen)."""
    goal = {objective: 1.0} if isinstance(objective, int) else objective
    names = list(dense)
    grid = weight_grid(len(names) + 1) if weights is None else [tuple(weights)]
    if not with_generated:
        grid = [w for w in grid if w[0] == 0.0]
    ks = rrf_k if isinstance(rrf_k, list) else [rrf_k]
    depths = sorted(set(report or []) | (set(goal) if isinstance(goal, dict) else set()))
    deepest = max(depths)
    alone = generated.top(deepest)
    lists = ([generated] if with_generated else []) + [dense[n] for n in names]
    candidates = FusionCandidates(lists, n_items)   # without generation: the generated list is not even a tie-break
    held = candidates.target_pairs(targets)
    tried = []
    for c in ks:
        for w in grid:
            if w[0] == 1.0:
                recalls = {k: recall_of_top(alone[:, :k], targets) for k in depths}
            else:
                ranks = candidates.target_ranks(w if with_generated else w[1:], c, held)
                recalls = {k: recall_of_ranks(ranks, targets, k) for k in depths}
            tried.append({"weights": dict(zip(["generated"] + names, w)), "rrf_k": c,
                          **{f"recall@{k}": r for k, r in recalls.items()}})
    score_points(tried, goal, list(report or depths))
    best = best_point(tried)
    return [best["weights"][n] for n in ["generated"] + names], best["rrf_k"], tried

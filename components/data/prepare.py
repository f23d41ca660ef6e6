"""Step `prepare`: dataset -> contract tables with head / tail / cold labels, plus long-tail figures.

Everything is checked before anything is written, and the `prepared/` folder is swapped in
whole, so a failure never leaves partial output behind.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from components.data.adapters import load_dataset
from components.runtime.atomic import atomic_dir, write_json
from components.runtime.paths import out_path
from components.data.contract import ITEM_COLUMNS, QUERY_COLUMNS, SPLITS, validate_items, validate_queries
from components.runtime.errors import ConfigError


def label_groups(popularity: np.ndarray, head_share: float) -> np.ndarray:
    """head = the most popular items that together hold `head_share` of training interactions;
    tail = the other items with popularity >= 1; cold = popularity 0.

    Ties are broken by row order, so the labels are deterministic.
    """
    if not 0 < head_share <= 1:
        raise ConfigError("data.head_share", f"must be in (0, 1], got {head_share}")
    pop = np.asarray(popularity, dtype=np.int64)
    groups = np.where(pop > 0, "tail", "cold").astype(object)
    total = int(pop.sum())
    if total == 0:
        return groups
    order = np.argsort(-pop, kind="stable")
    cum = np.cumsum(pop[order])
    n_head = int(np.searchsorted(cum, head_share * total - 1e-9) + 1)
    groups[order[:n_head]] = "head"
    return groups


def _top_share(pop: np.ndarray, frac: float) -> float:
    """Share of training interactions held by the top `frac` of items (at least one item)."""
    total = pop.sum()
    if total == 0:
        return 0.0
    k = max(1, math.ceil(frac * len(pop)))
    return float(np.sort(pop)[::-1][:k].sum() / total)


def popularity_stats(items: pd.DataFrame, queries: pd.DataFrame, params: dict) -> dict:
    """The long-tail figures of metrics/popularity.json.

    n_interactions = training interactions + the valid / test (query, target) pairs; for
    amazon-scientific this is the dataset's 58,492, for climate-fever its 4,681 pairs.
    """
    pop = items["popularity"].to_numpy(dtype=np.int64)
    eval_pairs = int(queries.loc[queries["split"] != "train", "targets"].map(len).sum())
    split_counts = queries["split"].value_counts()
    group_counts = items["group"].value_counts()
    return {
        "dataset": params["dataset"],
        "n_items": int(len(items)),
        "n_queries": {s: int(split_counts.get(s, 0)) for s in SPLITS},
        "n_train_interactions": int(pop.sum()),
        "n_interactions": int(pop.sum()) + eval_pairs,
        "top1pct_share": round(_top_share(pop, 0.01), 6),
        "top10pct_share": round(_top_share(pop, 0.10), 6),
        "groups": {g: int(group_counts.get(g, 0)) for g in ("head", "tail", "cold")},
        "head_share": float(params["data"]["head_share"]),
    }


def run_prepare(params: dict) -> dict:
    """Run the adapter, label groups, check the contract, then write the tables and figures."""
    items, queries = load_dataset(params)
    items = items.reset_index(drop=True)
    items["group"] = pd.Series(label_groups(items["popularity"].to_numpy(), float(params["data"]["head_share"])),
                               dtype="str")
    items = items[list(ITEM_COLUMNS) + [c for c in items.columns if c not in ITEM_COLUMNS]]
    queries = queries[list(QUERY_COLUMNS)].reset_index(drop=True)
    folder = out_path(params, "prepared")
    validate_items(items, str(folder / "items.parquet"), columns=ITEM_COLUMNS)
    validate_queries(queries, items, str(folder / "queries.parquet"))
    stats = popularity_stats(items, queries, params)
    with atomic_dir(folder) as tmp:
        items.to_parquet(tmp / "items.parquet", index=False)
        queries.to_parquet(tmp / "queries.parquet", index=False)
    write_json(stats, out_path(params, "metrics", "popularity.json"))
    return stats

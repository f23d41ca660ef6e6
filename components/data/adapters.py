"""Dataset adapters: each turns one source into (items, queries) in the data contract.

Items come back with `item_id`, `text`, `popularity` (training interactions); `prepare` adds
`group`. Queries come back with every column of the contract (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from components.data.contract import (check_texts, id_column, int_column, list_column, read_items, require_columns,
                                 single_id_lists, validate_items, validate_queries)
from components.runtime.errors import ConfigError, DataError
from components.runtime.extensions import entry, names, register
from components.data.readers import read_json, read_table

Frames = tuple[pd.DataFrame, pd.DataFrame]


def _max_users(params: dict) -> int:
    n = int(params["data"].get("max_users", 0) or 0)
    if n < 0:
        raise ConfigError("data.max_users", f"must be >= 0 (0 = all), got {n}")
    return n


def _max_history(params: dict) -> int:
    n = int(params["data"]["max_history"])
    if n < 1:
        raise ConfigError("data.max_history", f"must be >= 1, got {n}")
    return n


def _dataset_dir(params: dict, name: str) -> Path:
    folder = Path(params["data"]["root"]) / name
    if not folder.is_dir():
        raise DataError(folder, "dataset folder not found (run `dvc pull` or set data.root)")
    return folder


def _query_frame(rows: list[dict]) -> pd.DataFrame:
    """Contract dtypes: str ids, int order / emb_row, lists of str, text str or null."""
    df = pd.DataFrame.from_records(rows, columns=["query_id", "split", "order", "history", "text", "targets"])
    df["query_id"] = df["query_id"].astype(str)
    df["split"] = df["split"].astype(str)
    df["order"] = df["order"].astype("int64")
    df["text"] = df["text"].astype("str")
    is_text = df["text"].notna() & (df["text"].str.strip() != "")
    df["emb_row"] = np.where(is_text, np.cumsum(is_text) - 1, -1).astype("int64")
    return df


def _train_target_counts(queries: pd.DataFrame) -> Counter:
    return Counter(t for ts in queries.loc[queries["split"] == "train", "targets"] for t in ts)


# --------------------------------------------------------------------------- amazon-scientific
def _amazon_text(meta: dict) -> str:
    """Title, brand, categories, description: the fields that describe a product, densest first."""
    parts = [str(meta.get("title") or "").strip()]
    if str(meta.get("brand") or "").strip():
        parts.append(f"Brand: {str(meta['brand']).strip()}")
    cats = [c.strip() for c in str(meta.get("categories") or "").split(",") if c.strip()]
    if cats:
        parts.append("Categories: " + ", ".join(cats))
    parts.append(str(meta.get("description") or "").strip())
    return ". ".join(p.rstrip(". ") for p in parts if p.rstrip(". "))


def load_amazon_scientific(params: dict) -> Frames:
    """Sequential recommendation, leave-last-out split (TIGER / LETTER convention).

    Per user (items in time order): the last item is the test target, the one before it the
    validation target, each prefix of the rest predicts its next item (training). History keeps
    the last `data.max_history` items. Query id `u<user>-<position of the target>`.
    Popularity = occurrences of the item in the training part (all but the last two items of
    each sequence); with this definition 17 items have no training interaction (cold).
    """
    folder = _dataset_dir(params, "amazon-scientific")
    item_file, inter_file = folder / "Scientific.item.json", folder / "Scientific.inter.json"
    meta, inter = read_json(item_file), read_json(inter_file)
    if not isinstance(meta, dict) or not meta:
        raise DataError(item_file, "expected a non-empty JSON object {item index: {title, ...}}")
    if not isinstance(inter, dict) or not inter:
        raise DataError(inter_file, "expected a non-empty JSON object {user index: [item index, ...]}")
    users = sorted(inter, key=lambda u: (int(u) if str(u).isdigit() else float("inf"), str(u)))
    n_keep = _max_users(params)
    if n_keep:
        users = users[:n_keep]
    max_hist = _max_history(params)
    rows: list[dict] = []
    train_counts: Counter = Counter()
    for user in users:
        seq = [str(i) for i in inter[user]]
        if len(seq) < 3:
            raise DataError(inter_file, f"user {user!r} has {len(seq)} interactions; the split needs >= 3",
                            rows=[users.index(user)])
        n = len(seq)
        train_counts.update(seq[: n - 2])
        for pos in range(1, n):
            split = "test" if pos == n - 1 else "valid" if pos == n - 2 else "train"
            rows.append({"query_id": f"u{user}-{pos}", "split": split, "order": pos,
                         "history": seq[max(0, pos - max_hist): pos], "text": None, "targets": [seq[pos]]})
    touched = {i for u in users for i in map(str, inter[u])}
    ids = sorted((k for k in meta if str(k) in touched), key=lambda k: (int(k) if str(k).isdigit() else float("inf"), str(k)))
    items = pd.DataFrame({
        "item_id": pd.Series([str(k) for k in ids], dtype="str"),
        "text": pd.Series([_amazon_text(meta[k]) if isinstance(meta[k], dict) else "" for k in ids], dtype="str"),
    })
    validate_items(items, str(item_file))
    queries = _query_frame(rows)
    validate_queries(queries, items, str(inter_file))
    items["popularity"] = items["item_id"].map(lambda i: train_counts.get(i, 0)).astype("int64")
    return items, queries


# --------------------------------------------------------------------------- climate-fever
def _split_fractions(params: dict) -> tuple[float, float]:
    cf = params["data"]["climate_fever"]
    valid, test = float(cf["valid_frac"]), float(cf["test_frac"])
    if not (0 < valid < 1 and 0 < test < 1 and valid + test < 1):  # every split is needed (contract.SPLIT_USES)
        raise ConfigError("data.climate_fever", f"valid_frac, test_frac > 0 and their sum < 1, got {valid} + {test}")
    return valid, test


def _assign_splits(n: int, valid_frac: float, test_frac: float, seed: int) -> list[str]:
    """A fixed random split (its own seed, so a new model seed keeps the same test claims)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test, n_valid = round(n * test_frac), round(n * valid_frac)
    split = np.full(n, "train", dtype=object)
    split[perm[:n_test]] = "test"
    split[perm[n_test: n_test + n_valid]] = "valid"
    return split.tolist()


def load_climate_fever(params: dict) -> Frames:
    """Search-shaped: query = claim, items = Wikipedia articles, relevant = evidence articles.

    Claims are split train/valid/test with `data.split_seed`. Article text = title plus the
    evidence sentences of training claims only (no test leak); popularity = training claims
    that point at the article.
    """
    path = _dataset_dir(params, "climate-fever") / "climate-fever.jsonl"
    file = str(path)
    raw = read_table(path)
    require_columns(raw, ("claim_id", "claim", "evidences"), file)
    raw["claim_id"] = raw["claim_id"].astype(str)
    raw = raw.assign(_key=raw["claim_id"].map(lambda c: (int(c) if c.isdigit() else float("inf"), c)))
    raw = raw.sort_values("_key", kind="stable").drop(columns="_key").reset_index(drop=True)
    n_keep = _max_users(params)
    if n_keep:
        raw = raw.iloc[:n_keep].reset_index(drop=True)
    valid_frac, test_frac = _split_fractions(params)
    splits = _assign_splits(len(raw), valid_frac, test_frac, int(params["data"].get("split_seed", 0)))
    rows: list[dict] = []
    sentences: dict[str, dict[str, str]] = {}  # article -> evidence_id -> sentence (training claims)
    for pos, (rec, split) in enumerate(zip(raw.to_dict("records"), splits)):
        evidences = rec["evidences"]
        if not isinstance(evidences, list) or not all(isinstance(e, dict) and e.get("article") for e in evidences):
            raise DataError(file, "each evidence needs an 'article'", column="evidences", rows=[pos])
        articles = list(dict.fromkeys(str(e["article"]) for e in evidences))
        for art in articles:
            sentences.setdefault(art, {})
        if split == "train":
            for e in evidences:
                text = str(e.get("evidence") or "").strip()
                if text:
                    sentences[str(e["article"])].setdefault(str(e.get("evidence_id", text)), text)
        rows.append({"query_id": f"c{rec['claim_id']}", "split": split, "order": pos, "history": [],
                     "text": rec["claim"], "targets": articles})
    ids = sorted(sentences)
    items = pd.DataFrame({
        "item_id": pd.Series(ids, dtype="str"),
        "text": pd.Series([" ".join([f"{a}."] + list(sentences[a].values())) for a in ids], dtype="str"),
    })
    validate_items(items, file)
    queries = _query_frame(rows)
    validate_queries(queries, items, file)
    counts = _train_target_counts(queries)
    items["popularity"] = items["item_id"].map(lambda i: counts.get(i, 0)).astype("int64")
    return items, queries


# --------------------------------------------------------------------------- generic
def _generic_path(params: dict, key: str) -> Path:
    value = str(params["data"].get("generic", {}).get(key) or "")
    if not value:
        raise ConfigError(f"data.generic.{key}", "dataset=generic needs a file path (parquet / csv / jsonl)")
    return Path(value)


def load_generic(params: dict) -> Frames:
    """Bring your own catalog: two files in the contract format (parquet, CSV or JSONL).

    items file: `item_id`, `text` (non-empty); other columns are kept.
    queries file: `query_id`, `split` (train | valid | test), `text` (search queries) and / or
    `history` (item ids, oldest first; capped to the last `data.max_history`), `target` (one
    item id) or `targets` (a list), optional `order` (int, defaults to the row position).
    Lists: native lists in parquet / JSONL; in CSV a JSON array (`["a","b"]`) or ids
    separated by spaces (`a b`). Popularity = training queries whose targets include the item.
    `data.max_users` > 0 keeps the first N queries by query_id and the items they touch.
    """
    item_path, query_path = _generic_path(params, "items"), _generic_path(params, "queries")
    query_file = str(query_path)
    items = read_items(item_path)
    raw = read_table(query_path)
    require_columns(raw, ("query_id", "split"), query_file)
    if "target" not in raw.columns and "targets" not in raw.columns:
        raise DataError(query_file, "missing column (need 'target' or 'targets')", column="targets")
    if "text" not in raw.columns and "history" not in raw.columns:
        raise DataError(query_file, "missing column (need 'text' or 'history')", column="text")
    max_hist = _max_history(params)
    query_ids = id_column(raw["query_id"], query_file, "query_id")
    targets = list_column(raw, "targets", query_file) if "targets" in raw.columns else \
        single_id_lists(raw["target"], query_file, "target")
    history = list_column(raw, "history", query_file) if "history" in raw.columns else \
        pd.Series([[] for _ in range(len(raw))], index=raw.index, dtype=object)
    order = int_column(raw["order"], query_file, "order") if "order" in raw.columns else \
        pd.Series(range(len(raw)), index=raw.index, dtype="int64")
    texts = raw["text"] if "text" in raw.columns else pd.Series([None] * len(raw), index=raw.index, dtype=object)
    check_texts(texts, query_file, required=False)
    rows = [{"query_id": q, "split": s.strip() if isinstance(s, str) else s, "order": int(o), "history": h[-max_hist:],
             "text": t if isinstance(t, str) and t.strip() else None, "targets": ts}
            for q, s, o, h, t, ts in zip(query_ids, raw["split"], order, history, texts, targets)]
    queries = _query_frame(rows)
    validate_queries(queries, items, query_file)
    n_keep = _max_users(params)
    if n_keep:
        queries = queries.sort_values("query_id", kind="stable").iloc[:n_keep]
        queries = _query_frame(queries.drop(columns="emb_row").sort_index().to_dict("records"))
        touched = {i for col in ("history", "targets") for ids in queries[col] for i in ids}
        items = items[items["item_id"].isin(touched)].reset_index(drop=True)
    counts = _train_target_counts(queries)
    items["popularity"] = items["item_id"].map(lambda i: counts.get(i, 0)).astype("int64")
    return items, queries


# The datasets: each name is registered once, here; the params schema's `dataset` choice reads them.
register("dataset", "amazon-scientific", load_amazon_scientific)
register("dataset", "climate-fever", load_climate_fever)
register("dataset", "generic", load_generic)


def load_dataset(params: dict) -> Frames:
    """Run the adapter named by params `dataset`."""
    name = params.get("dataset")
    if name not in names("dataset"):
        raise ConfigError("dataset", f"unknown dataset {name!r}; valid names: {', '.join(names('dataset'))}")
    adapter: Callable[[dict], Frames] = entry("dataset", name)
    return adapter(params)

"""results/<dataset>.json: the comparison's headline rows, the file quality is judged from.

One row per method with each metric as {"mean", "std"} over seeds (std null for one seed;
the hallucination metrics null for non-generative rows: `hallucination` over all beams,
`hallucination@k` over the top k, `hallucination_norm` over the chance rate of random SIDs of
the same lengths, see components.ranking.metrics.hallucination_table), plus the command that produced
it, so the file stays true to the command it names. A row asked for that did not run (SASRec on a
catalog without histories) stays, every metric null, with a `note` saying why. A user's catalog
(`dataset: generic`) goes by its own name (catalog_name): results/generic-<name>.json with `"catalog":
<name>`, so two catalogs compared in one checkout keep two files and say which they cover.
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import pandas as pd

from components.ranking.metrics import GROUPS
from components.runtime.atomic import write_json

# baseline keys of eval.baselines -> their row names in the results file
ROW_NAMES = {"bm25": "BM25", "dense": "dense", "two_tower": "two-tower", "popular": "most popular"}


def catalog_name(params: dict) -> str:
    """The name a comparison's results, plots and report go by: the dataset's, or for a user's catalog
    `data.generic.name`, by default the items file's folder name (its own name at the project root) in
    [a-z0-9-]: data/shop/items.jsonl -> 'shop', my_items.csv -> 'my-items'."""
    if params["dataset"] != "generic":
        return str(params["dataset"])
    generic = params["data"]["generic"]
    if generic.get("name"):
        return str(generic["name"])
    items = Path(str(generic["items"]))
    for text in (items.parent.name, items.stem):
        name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
        if name:
            return name
    return "catalog"


def results_name(params: dict) -> str:
    """The results file's name (no suffix): the dataset's, or 'generic-<catalog name>' for a user's catalog
    (never a built-in dataset's file)."""
    return str(params["dataset"]) if params["dataset"] != "generic" else f"generic-{catalog_name(params)}"


def _stat(mean: object, std: object) -> dict | None:
    m = None if mean is None or pd.isna(mean) else float(mean)
    if m is None:
        return None
    s = None if std is None or pd.isna(std) or math.isnan(float(std)) else float(std)
    return {"mean": round(m, 6), "std": None if s is None else round(s, 6)}


def result_rows(table: pd.DataFrame, k: int, budgets: list[int] | None = None) -> list[dict]:
    """Rows in table order: R@k overall and by group, NDCG@k, MRR@k, hallucination (all beams, top k,
    over chance), recall@all, Ret-Per; for each budget K beyond k, R@K and reach@K (the share of queries
    given K items), and by group at the deepest. A row the table notes as skipped (its `note` column) keeps
    every key, null, and says why in `note`."""
    rows = []
    methods = list(dict.fromkeys(table.index.get_level_values(0)))
    for method in methods:
        row: dict = {"name": ROW_NAMES.get(method, method)}
        part = table.loc[method]
        overall = part.loc["overall"]
        if isinstance(overall.get("note"), str):
            row["note"] = overall["note"]
        seeds = int(overall["seeds"])
        cell = lambda frame, key: _stat(frame.get(key), frame.get(f"{key} std"))  # noqa: E731
        row[f"R@{k}"] = cell(overall, f"recall@{k}")
        for group in GROUPS:
            row[f"R@{k}_{group}"] = cell(part.loc[group], f"recall@{k}") if group in part.index else None
        row[f"NDCG@{k}"] = cell(overall, f"ndcg@{k}")
        row[f"MRR@{k}"] = cell(overall, f"mrr@{k}")
        row["hallucination"] = cell(overall, "hallucination")
        row[f"hallucination@{k}"] = cell(overall, f"hallucination@{k}")
        row["hallucination_norm"] = cell(overall, "hallucination_norm")
        row["R@all"] = cell(overall, "recall@all")
        row["ret_per"] = cell(overall, "ret_per")
        deep = [b for b in budgets or [] if b != k]
        for b in deep:
            row[f"R@{b}"] = cell(overall, f"recall@{b}")
            row[f"reach@{b}"] = cell(overall, f"reach@{b}")
        if deep:
            for group in GROUPS:
                row[f"R@{max(deep)}_{group}"] = cell(part.loc[group], f"recall@{max(deep)}") \
                    if group in part.index else None
        row["seeds"] = seeds
        rows.append(row)
    return rows


def input_digests(params: dict) -> dict[str, str]:
    """md5 of the prepared tables and embeddings the comparison read (what the rows were computed on)."""
    from components.runtime.paths import out_path

    out = {}
    for rel in ("prepared/items.parquet", "prepared/queries.parquet", "embeddings/items.npy"):
        path = out_path(params, *rel.split("/"))
        if path.exists():
            out[rel] = hashlib.md5(path.read_bytes()).hexdigest()
    return out


def write_results_file(table: pd.DataFrame, params: dict, seeds: list[int], command: str, inputs: dict[str, str],
                       path: Path | None = None) -> Path:
    """Write `path` (default <eval.results_dir>/<results_name>.json) atomically; returns it. A user's catalog's
    file says which catalog it covers (`catalog`)."""
    ev = params["eval"]
    k = int(ev["headline_k"])
    named = {"catalog": catalog_name(params)} if params["dataset"] == "generic" else {}
    doc = {"dataset": params["dataset"], **named, "command": command, "seeds": [int(s) for s in seeds],
           "split": "test", "k": k, "retriever_beam": int(params["retriever"]["beam"]), "inputs": inputs,
           "budgets": [int(b) for b in ev["budgets"]], "rows": result_rows(table, k, list(ev["budgets"]))}
    path = path or Path(str(ev.get("results_dir") or "results")) / f"{results_name(params)}.json"
    write_json(doc, path)
    return path

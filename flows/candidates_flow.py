"""Flow: per-query top-K candidates from two model versions A and B, for an A/B test.

`sa2crq candidates --a DIR --b DIR --queries FILE [--k 100] [--out outputs/ab] [--[no-]exclude-history]`
calls `candidates_flow(params=..., opt_a=..., opt_b=..., opt_queries=..., opt_k=..., opt_out=...,
opt_exclude_history=...)`. With exclude_history (default serve.exclude_history, as the service
answers), a history query's own items are left out of its candidates, still k of them
(components/serving/history.py).
A version is an out_dir (prepared/, embeddings/, sids/, retriever/), for instance `outputs`
or `outputs/versions/<v>`; a folder that holds only some of them (a SID-table-only version)
takes the rest from params' out_dir. Writes, atomically:
- <out>/candidates.parquet: query_id, variant (A | B), rank (0-based), item_id, score, sid;
- <out>/stats.json: Jaccard@K between A and B, each variant's share of head / tail / cold
  items, catalog coverage, and queries it could not answer.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from components.data.contract import check_texts, id_column, list_column, require_columns
from components.data.readers import read_table
from components.data.values import is_null
from components.retrieval.retrieve import CANDIDATE_COLUMNS, retrieve
from components.runtime.atomic import write_json, write_parquet
from components.runtime.errors import DataError, Sa2crqError
from components.runtime.locks import lock_folder
from components.runtime.paths import out_path
from components.runtime.safe_load import read_frame
from components.serving.history import exclude_history
from flows.flow_params import apply_overrides, flow_run_name
from flows.tracking import log_metrics, wandb_run

PARTS = ("prepared", "embeddings", "sids", "retriever")
# what each part of a version must hold to be read (components.retrieval.retriever_data.load_inputs)
PART_FILES = {"prepared": ("items.parquet",), "embeddings": ("items.npy",), "sids": ("sid_table.parquet", "meta.json"),
              "retriever": ("model.pt",)}


def read_queries(path: str | Path) -> pd.DataFrame:
    """Queries in the data contract format: query_id plus text and / or history (item ids);
    targets, split and the rest are not needed. Text queries are encoded afresh."""
    file = str(path)
    raw = read_table(path)
    require_columns(raw, ("query_id",), file)
    if "text" not in raw.columns and "history" not in raw.columns:
        raise DataError(file, "missing column (need 'text' or 'history')", column="text")
    ids = id_column(raw["query_id"], file, "query_id")
    null = ids.map(lambda v: v is None or not v.strip())
    if null.any():
        raise DataError(file, "null or empty id", column="query_id", rows=np.flatnonzero(null))
    dup = ids.duplicated()
    if dup.any():
        raise DataError(file, f"duplicate id {ids[dup].iloc[0]!r}", column="query_id", rows=np.flatnonzero(dup))
    history = list_column(raw, "history", file) if "history" in raw.columns else pd.Series([[]] * len(raw))
    text = raw["text"] if "text" in raw.columns else pd.Series([None] * len(raw))
    check_texts(text, file, required=False)
    text = [None if is_null(t) or not t.strip() else t for t in text]
    empty = np.array([not h and t is None for h, t in zip(history, text)])
    if empty.any():
        raise DataError(file, "query has neither text nor history", column="text", rows=np.flatnonzero(empty))
    return pd.DataFrame({"query_id": ids.to_numpy(), "history": list(history), "text": text,
                         "targets": [[] for _ in range(len(raw))], "emb_row": np.full(len(raw), -1, np.int64)})


def check_version(option: str, path: str | Path) -> None:
    """Sa2crqError unless `path` is a model version: a folder holding at least one of PARTS, each
    with its files. Without this a typo in --a or --b gave a folder with no parts, which took them
    all from params' out_dir and compared the live version with itself (jaccard 1.0, exit 0)."""
    folder = Path(path)
    where = f"candidates {option} {folder}"
    if not folder.exists():
        raise Sa2crqError(f"{where}: no such folder")
    if not folder.is_dir():
        raise Sa2crqError(f"{where}: not a folder (a version is an out_dir such as outputs or outputs/versions/<v>)")
    present = [part for part in PARTS if (folder / part).exists()]
    if not present:
        raise Sa2crqError(f"{where}: not a model version, it has none of {', '.join(p + '/' for p in PARTS)} "
                          "(a version is an out_dir such as outputs or outputs/versions/<v>)")
    for part in present:
        missing = [f for f in PART_FILES[part] if not (folder / part / f).is_file()]
        if missing:
            raise Sa2crqError(f"{where}: not a model version, {part}/ lacks {', '.join(missing)}")


def version_view(version: Path, base: Path, into: Path) -> Path:
    """A folder of links: each part from the version when it has one, else from base."""
    into.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        src = version / part if (version / part).exists() else base / part
        if not src.exists():
            raise FileNotFoundError(f"{version}: no {part}/ in the version or in {base}")
        os.symlink(src.resolve(), into / part)
    return into


def _known_history(queries: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """Drop history ids a version's catalog lacks (e.g. items newer than it), then queries left empty."""
    known = set(items["item_id"].astype(str))
    q = queries.copy()
    q["history"] = q["history"].map(lambda h: [i for i in h if i in known])
    return q[(q["history"].map(len) > 0) | q["text"].notna()]


@task(name="candidates", cache_policy=NO_CACHE)
def variant_task(params: dict, name: str, version: str, queries: pd.DataFrame, k: int, exclude: bool = False
                 ) -> tuple[pd.DataFrame, dict]:
    """Top-k items per query for one version (without each query's history items when `exclude`),
    and its group shares and coverage."""
    with tempfile.TemporaryDirectory(prefix=f"view-{name}-") as tmp:
        view = version_view(Path(version), out_path(params), Path(tmp) / "v")
        items = read_frame(view / "prepared" / "items.parquet")
        q = _known_history(queries, items)
        ranked = retrieve(params, q, beam=k, out_dir=view) if len(q) else pd.DataFrame(columns=CANDIDATE_COLUMNS)
        if exclude and len(q):
            ranked = exclude_history(ranked, q, k, k, lambda sub, width: retrieve(params, sub, beam=width, out_dir=view))
        meta = json.loads((view / "sids" / "meta.json").read_text())
    ranked = ranked[ranked["rank"] < k].copy()
    ranked.insert(1, "variant", name)
    groups = ranked["item_id"].map(items.set_index("item_id")["group"]).value_counts(normalize=True)
    stats = {"path": str(version), "sid_version": meta.get("version"), "n_items": int(len(items)),
             "n_queries_answered": int(ranked["query_id"].nunique()),
             "n_queries_unanswerable": int(len(queries) - len(q)),
             "mean_candidates_per_query": float(ranked.groupby("query_id").size().mean()) if len(ranked) else 0.0,
             "coverage": float(ranked["item_id"].nunique() / len(items)),
             **{f"{g}_share": float(groups.get(g, 0.0)) for g in ("head", "tail", "cold")}}
    return ranked[list(CANDIDATE_COLUMNS)].reset_index(drop=True), stats


def jaccard_per_query(cands: pd.DataFrame, query_ids: list[str]) -> pd.Series:
    """|A ∩ B| / |A ∪ B| of the two variants' candidate sets, per query (1.0 when both are empty)."""
    sets = cands.groupby(["query_id", "variant"])["item_id"].agg(frozenset)
    out = {}
    for q in query_ids:
        a, b = sets.get((q, "A"), frozenset()), sets.get((q, "B"), frozenset())
        union = a | b
        out[q] = len(a & b) / len(union) if union else 1.0
    return pd.Series(out, name="jaccard", dtype=float)


@flow(name="candidates", flow_run_name=flow_run_name)
def candidates_flow(params: dict, opt_a: str, opt_b: str, opt_queries: str, opt_k: int = 100,
                    opt_out: str = "outputs/ab", overrides: list[str] | None = None,
                    opt_exclude_history: bool | None = None) -> dict:
    """Write candidates.parquet and stats.json for versions A and B; returns the stats."""
    params = apply_overrides(params, overrides)
    exclude = bool(params["serve"]["exclude_history"] if opt_exclude_history is None else opt_exclude_history)
    k = int(opt_k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    check_version("--a", opt_a)
    check_version("--b", opt_b)
    queries = read_queries(opt_queries)
    parts, variants = [], {}
    for name, version in (("A", opt_a), ("B", opt_b)):
        ranked, variants[name] = variant_task(params, name, str(version), queries, k, exclude)
        parts.append(ranked)
    cands = pd.concat(parts, ignore_index=True)
    cands = cands.astype({"query_id": str, "variant": str, "rank": "int64", "item_id": str, "score": "float64",
                          "sid": str})
    jac = jaccard_per_query(cands, queries["query_id"].tolist())
    stats = {"k": k, "exclude_history": exclude, "n_queries": int(len(queries)), "queries_file": str(opt_queries),
             f"jaccard@{k}": float(jac.mean()), f"jaccard@{k}_median": float(jac.median()),
             "identical_query_share": float((jac == 1.0).mean()), "variants": variants}
    out = Path(opt_out)
    with lock_folder(out):   # the pair comes from one run; a lock domain of its own, even inside outputs/
        write_parquet(cands, out / "candidates.parquet")
        write_json(stats, out / "stats.json")
    create_table_artifact(table=[{"variant": n, **{k2: v for k2, v in s.items() if k2 != "path"}}
                                 for n, s in variants.items()], key="ab-candidates",
                          description=f"Jaccard@{k} between A and B: {stats[f'jaccard@{k}']:.4f}")
    with wandb_run(params, "candidates", "candidates") as run:
        log_metrics(run, {kk: v for kk, v in stats.items() if kk != "variants"} | {"variants": variants})
    return stats

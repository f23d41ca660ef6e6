"""Flow: new items arrive -> SIDs with the frozen tokenizer -> fine-tune with replay -> check -> promote.

`sa2crq retrain --new-items FILE` calls `retrain_flow(params=..., opt_new_items=FILE)`.
The whole flow holds the out_dir lock (components/runtime/locks.py) and first rolls back a promotion
that a killed run left half-done (components/lifecycle/versions.py `recover`).
1. read the file (data contract item format) and check it; ids already in the catalog are refused;
2. embed the new items with the project's encoder (components.data.embed.encode_cached: texts already
   in <out_dir>/embed_cache are not encoded again);
3. SIDs from the frozen tokenizer (components.tokenizers.sid_tokenizer.assign_new_items); extension rows
   grow only where a new item is farther than `grow_threshold` from every row of a layer;
4. a candidate version in <out_dir>/versions/<new>/ (catalog, embeddings, tokenizer, SIDs;
   old SIDs checked unchanged), and the retriever fine-tuned there on the new items'
   indexing pairs plus replayed old pairs (flows/retriever_finetune.py). <new> is the next free
   `.r<N>` (components/lifecycle/versions.py `next_version`: never a kept, registered or leftover name), and the
   folder gets its UNCHECKED marker before anything else, removed only once the checks are decided;
5. checks (flows/retrain_checks.py): old items' recall before vs after may not drop by more
   than `max_old_recall_drop`; the new items' recall is reported (and gated by `min_new_recall`);
6. promotion when the checks pass (components/lifecycle/versions.py): the live folders move to
   versions/<old>/, the candidate's into place (journal first, so a kill at any point is
   rolled back or finished), and the model registry (components/lifecycle/registry.py: GTO, dvc.lock) names
   it prod; otherwise the live version stays and the candidate is kept in versions/<new>/
   with the reason.
The decision goes to <out_dir>/metrics/retrain.json, versions/history.json, a Prefect
markdown artifact and W&B.

Each numeric step pins torch's thread count to the one its pipeline step uses (embedding:
`embed.num_threads`; SIDs: `tokenizer.threads`; fine-tuning and checks: `retriever.num_threads`), so
a retrain's floats depend on its params alone, not on what the process ran before (the fine-tune
leaves 1 thread behind, so a second retrain in one process encoded and assigned on other threads).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from components.data.embed import encode_cached, encode_settings, text_cache
from components.lifecycle.registry import check_version_name
from components.lifecycle.versions import (
    begin_candidate,
    end_candidate,
    live_version,
    next_version,
    promote,
    record,
    recover,
    show_versions,
    versions_dir,
)
from components.retrieval.retriever import load_retriever
from components.runtime.atomic import write_json
from components.runtime.config import params_hash
from components.runtime.config_schema import typed_params
from components.runtime.locks import lock_folder
from components.runtime.paths import out_path
from components.runtime.safe_load import load_matrix, read_frame
from components.tokenizers.sid_table import changed_sids, read_sid_table
from components.tokenizers.sid_tokenizer import assign_new_items, load_tokenizer
from flows.catalog_update import read_new_items, write_candidate
from flows.flow_params import apply_overrides, flow_run_name
from flows.retrain_checks import decide, index_queries, recall_at, sample_rows, uses_history
from flows.retriever_finetune import finetune_retriever
from flows.tasks import is_transient
from flows.tracking import log_artifact, log_metrics, wandb_run


def retrain_config(params: dict) -> dict:
    """flows.retrain, checked once by the schema (components/runtime/config_schema.py)."""
    return typed_params(params).flows.retrain.model_dump()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch on exactly n CPU threads for the block (the process's count is restored after): float
    sums, and so vectors, SIDs and weights, can differ with the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@task(name="read-new-items", cache_policy=NO_CACHE)
def read_items_task(path: str, base: Path) -> pd.DataFrame:
    return read_new_items(path, read_frame(base / "prepared" / "items.parquet"))


@task(name="embed-new-items", retries=2, retry_delay_seconds=5, retry_condition_fn=is_transient, cache_policy=NO_CACHE)
def embed_task(params: dict, texts: list[str]) -> np.ndarray:
    """Through the run's vector cache: a retried or repeated retrain encodes each new text once, on the
    embed step's threads.

    Texts equal up to `embed.max_chars` (one cache key) are encoded once and share the vector. Encoded
    together, such duplicates can land in two batches, and a batch's padding moves a vector by ~1e-7:
    the first retrain gave them two vectors and stored both under one key, every later retrain (from
    the cache) gave both the one that key reads back, so the first retrain's model differed from the
    rest (issue 25, finding 10)."""
    settings = encode_settings(params)
    cut = [str(t)[: settings["max_chars"]] for t in texts]
    unique = list(dict.fromkeys(cut))
    with torch_threads(int(params["embed"].get("num_threads", 2))):
        vectors, _ = encode_cached(unique, text_cache(params), int(params["embed"].get("cache_every_batches", 8)),
                                   **settings)
    row = {text: i for i, text in enumerate(unique)}
    return vectors[[row[text] for text in cut]]


def grow_threshold(cfg: dict, tokenizer, old_emb: np.ndarray) -> float | None:
    """`auto`: the grow_quantile of the catalog's first-layer residual distances (new items
    farther from every first-layer row than nearly all catalog items get a new row)."""
    if cfg["grow_threshold"] != "auto":
        return None if cfg["grow_threshold"] is None else float(cfg["grow_threshold"])
    return float(np.quantile(tokenizer.residual_distances(old_emb)[:, 0], float(cfg["grow_quantile"])))


@task(name="assign-sids", cache_policy=NO_CACHE)
def candidate_task(params: dict, cfg: dict, base: Path, cand: Path, new_items: pd.DataFrame,
                   new_emb: np.ndarray, version: str) -> dict:
    """SIDs for the new items and the candidate's catalog, embeddings, tokenizer and SID table (on the
    assign_ids step's threads)."""
    with torch_threads(int(params["tokenizer"].get("threads", 1))):
        tok = load_tokenizer(params)
        threshold = grow_threshold(cfg, tok, load_matrix(base / "embeddings" / "items.npy"))
        codes, _, grown = assign_new_items(tok, new_emb, threshold)
    summary = write_candidate(base, cand, new_items, new_emb, codes, tok, version)
    return {**summary, "grow_threshold": threshold, "rows_added": grown["rows_added"]}


@task(name="finetune-retriever", cache_policy=NO_CACHE)
def finetune_task(params_cand: dict, base: Path, new_ids: list[str], cfg: dict):
    return finetune_retriever(params_cand, base / "retriever" / "model.pt", new_ids, cfg)


@task(name="check-recall", cache_policy=NO_CACHE)
def checks_task(params: dict, cfg: dict, base: Path, cand: Path, model, new_ids: list[str]) -> dict:
    """Recall of old items before / after and of the new items after, plus SID stability."""
    k, seed = int(cfg["recall_k"]), int(params.get("seed", 0))
    old_items = read_frame(base / "prepared" / "items.parquet")
    cand_items = read_frame(cand / "prepared" / "items.parquet")
    queries = read_frame(base / "prepared" / "queries.parquet")
    history = uses_history(queries)
    test = sample_rows(queries[queries["split"] == "test"], int(cfg["eval_queries"]), seed)
    old_ids = sample_rows(old_items, int(cfg["eval_items"]), seed)["item_id"].astype(str).tolist()
    old_index = index_queries(old_items, old_ids, history)
    checks: dict = {"k": k, "n_old_test_queries": len(test), "n_old_index_queries": len(old_index),
                    "n_new_index_queries": len(new_ids)}
    for name, q in (("old_test", test), ("old_index", old_index)):
        before = recall_at(params, q, old_items, k, base)
        after = recall_at(params, q, cand_items, k, cand, model=model)
        checks[name] = {"before": before, "after": after, "drop": before - after}
    new_q = index_queries(cand_items, new_ids, history)
    grown = json.loads((cand / "sids" / "meta.json").read_text())["codebook_sizes"] != \
        json.loads((base / "sids" / "meta.json").read_text())["codebook_sizes"]
    # before fine-tuning: the live model decoding the candidate's SIDs (impossible once rows grew)
    new_before = float("nan") if grown else recall_at(params, new_q, cand_items, k, cand, model=load_retriever(
        base / "retriever" / "model.pt"))
    checks["new_index"] = {"before": new_before, "after": recall_at(params, new_q, cand_items, k, cand, model=model)}
    old_table = read_sid_table(base / "sids" / "sid_table.parquet")
    changed = changed_sids(old_table, read_sid_table(cand / "sids" / "sid_table.parquet"))
    checks["sids_stable"], checks["n_changed_sids"] = not changed, len(changed)
    return checks


def _markdown(result: dict) -> str:
    c = result["checks"]
    k = c["k"]
    lines = [f"## Retrain {result['candidate']} ({'promoted' if result['promoted'] else 'not promoted'})", "",
             f"Reason: {result['reason']}", "",
             f"| query set | recall@{k} before | recall@{k} after |", "|---|---|---|",
             f"| old test queries ({c['n_old_test_queries']}) | {c['old_test']['before']:.4f} | {c['old_test']['after']:.4f} |",
             f"| old items, indexing ({c['n_old_index_queries']}) | {c['old_index']['before']:.4f} | "
             f"{c['old_index']['after']:.4f} |",
             f"| new items, indexing ({c['n_new_index_queries']}) | {c['new_index']['before']:.4f} | "
             f"{c['new_index']['after']:.4f} |", "",
             f"Old SIDs unchanged: {c['sids_stable']}; grown rows per layer: {result['sids']['rows_added']}."]
    return "\n".join(lines) + "\n"


@flow(name="retrain", flow_run_name=flow_run_name)
def retrain_flow(params: dict, opt_new_items: str, overrides: list[str] | None = None) -> dict:
    """Give new items SIDs, fine-tune with replay, check old / new recall, promote or keep the old."""
    params = apply_overrides(params, overrides)
    cfg = retrain_config(params)
    base = out_path(params)
    with lock_folder(base):   # one writer per out_dir: steps, flows and other retrains wait or are refused
        recovered = recover(base)
        old_version = check_version_name(live_version(base))
        version = next_version(base, old_version)
        cand = versions_dir(base) / version
        new_items = read_items_task(str(opt_new_items), base)
        new_emb = embed_task(params, new_items["text"].tolist())
        begin_candidate(cand, {"candidate": version, "previous": old_version, "new_items_file": str(opt_new_items),
                               "why": "its retrain stopped before the checks finished"})
        sids = candidate_task(params, cfg, base, cand, new_items, new_emb, version)
        params_cand = {**params, "out_dir": str(cand)}
        new_ids = new_items["item_id"].tolist()
        model, finetune = finetune_task(params_cand, base, new_ids, cfg)
        checks = checks_task(params, cfg, base, cand, model, new_ids)
        passed, reason = decide(checks, float(cfg["max_old_recall_drop"]), float(cfg["min_new_recall"]))
        promoted = bool(passed and cfg["promote"])
        if passed and not cfg["promote"]:
            reason += " (flows.retrain.promote is false: kept as a candidate)"
        decision = {"new_items_file": str(opt_new_items), "previous": old_version, "candidate": version,
                    "reason": reason, "sids": sids, "finetune": finetune, "checks": checks,
                    "params_hash": params_hash(params)}
        end_candidate(cand, decision, passed)
        if promoted:
            promote(base, version)
        registry = show_versions(base) if promoted else None
        result = {**decision, "live": version if promoted else old_version, "promoted": promoted,
                  "recovered_interrupted_promotion": recovered, "registry": registry}
        record(base, {k: result[k] for k in ("previous", "candidate", "live", "promoted", "reason", "new_items_file")})
        write_json(result, out_path(params, "metrics", "retrain.json"))
    create_markdown_artifact(markdown=_markdown(result), key="retrain-decision", description=reason)
    with wandb_run(params, "retrain", "retrain") as run:
        log_metrics(run, {"checks": checks, "finetune": finetune, "sids": sids, "promoted": float(promoted)}, "retrain")
        live = base if promoted else cand
        log_artifact(run, f"sid-table-{version}", "sid_table", [live / "sids"])
        log_artifact(run, f"codebooks-{version}", "codebooks", [live / "tokenizer"])
    return json.loads(json.dumps(result, default=str))

"""The `evaluate` step: the trained generative retriever and the baselines on the test split.

Writes eval/results.json (per method and group: metrics with 95% CIs), eval/deciles.json,
metrics/eval.json (headline numbers for `dvc metrics show`), report/report.md + .html and
plots/eval_*.png, and logs the same to Weights & Biases (offline unless wandb.mode says
otherwise; WANDB_MODE=disabled turns it off).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.baselines.registry import baseline_label, baseline_names, get_baseline
from components.ranking.metrics import (
    GROUPS,
    drop_history_items,
    evaluate_ranked,
    hallucination_table,
    issued_by_length,
    recall_by_popularity_decile,
)
from components.runtime.atomic import write_json
from components.runtime.config import params_hash
from components.runtime.errors import ConfigError, DataError
from components.runtime.paths import out_path, wandb_dir
from components.runtime.runtime_env import set_offline_defaults
from components.runtime.safe_load import load_matrix, read_frame

HEADLINE = ("recall@{k}", "ndcg@{k}", "mrr@{k}", "recall@all", "ret_per", "hallucination", "hallucination@{k}",
            "hallucination_norm")


def slug(name: str) -> str:
    """A key or folder name from a title: 'SARQ (tau=4)' -> 'sarq_tau_4'."""
    return re.sub(r"[^a-z0-9@]+", "_", name.lower()).strip("_")


@dataclass
class EvalInputs:
    """What the evaluation reads from earlier steps (paths relative to out_dir)."""

    items: pd.DataFrame
    train: pd.DataFrame
    test: pd.DataFrame
    item_emb: np.ndarray
    query_emb: np.ndarray | None
    valid: pd.DataFrame | None = None  # checkpoint choice of trained baselines (SASRec)


def load_eval_inputs(params: dict) -> EvalInputs:
    """Read prepared items/queries and embeddings; fail with the file's name when one is off."""
    root = out_path(params)
    items = read_frame(root / "prepared" / "items.parquet")
    queries = read_frame(root / "prepared" / "queries.parquet")
    item_emb = load_matrix(root / "embeddings" / "items.npy")
    q_path = root / "embeddings" / "queries.npy"
    query_emb = load_matrix(q_path) if q_path.exists() else None
    if len(item_emb) != len(items):
        raise DataError(root / "embeddings" / "items.npy",
                        f"{len(item_emb)} rows but prepared/items.parquet has {len(items)}")
    test = queries[queries["split"] == "test"]
    if test.empty:
        raise DataError(root / "prepared" / "queries.parquet", "no query has split == 'test'", column="split")
    return EvalInputs(items, queries[queries["split"] == "train"], test, item_emb, query_emb,
                      queries[queries["split"] == "valid"])


def check_eval_params(params: dict) -> None:
    """Fail early on what a baseline's own check refuses (its keys are the schema's: checked with params)."""
    for name in params["eval"]["baselines"]:
        get_baseline(name).check_params(params)


def eval_depth(params: dict) -> int:
    """How many items the baselines return: the deepest K evaluated."""
    ev = params["eval"]
    return int(max(list(ev["ks"]) + list(ev["deep_ks"]) + list(ev["budgets"])))


def fetch_depth(params: dict) -> int:
    """Items a baseline fetches: eval_depth, plus room for the history items that exclude_history removes."""
    extra = int(params["data"]["max_history"]) if params["eval"].get("exclude_history") else 0
    return eval_depth(params) + extra


def run_baseline(name: str, params: dict, data: EvalInputs) -> pd.DataFrame | None:
    """Ranked results of one registered baseline (components/baselines/registry.py) on the test queries;
    None (logged) when it does not apply to the data."""
    if name not in baseline_names():
        raise ConfigError("eval.baselines", f"unknown baseline {name!r}; choose from {list(baseline_names())}")
    return get_baseline(name).run(params, data, fetch_depth(params))


def check_sid_version(params: dict) -> None:
    """DataError unless retriever/model.pt was trained on the SID table in place (its config's
    `sid_version` against sids/meta.json `version`). SIDs assigned again (a tail tokenizer trained
    again, another method) under a retriever that learned the old ones would decode to other items
    and still give a number."""
    from components.runtime.torch_files import load_weights
    from components.tokenizers.sid_table import live_version

    root = out_path(params)
    model_file = root / "retriever" / "model.pt"
    if not model_file.exists():
        raise FileNotFoundError(f"{model_file}: no retriever checkpoint (run the train_retriever step first)")
    config = load_weights(model_file, keys=("state_dict", "config"), rerun="the train_retriever step")["config"]
    trained_on, live = config.get("sid_version"), live_version(root)
    if trained_on != live:
        raise DataError(model_file, f"trained on SID version {trained_on!r}, but {root / 'sids'} holds version "
                                    f"{live!r}: run train_retriever again (or restore the SIDs it was trained on)")


def run_generative(params: dict, test: pd.DataFrame) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Constrained and unconstrained ranked results of the trained retriever, and per-query hallucination.

    The constrained list reaches the deepest eval.budgets for every query (retrieve_at_least: a second,
    deeper decode for the queries its first beam leaves short); the unconstrained one is read as decoded
    at retriever.beam (its invalid SIDs can leave it short: reach@K says so).

    Hallucination (components.ranking.metrics.hallucination_table): over all B beams, over the top
    eval.headline_k beams, and normalised by the chance rate of random SIDs of the same lengths,
    which needs the decoder's vocabulary (sids/meta.json codebook_sizes up to max_len, from which
    the retriever's vocabulary is built) and the issued SIDs (sids/sid_table.parquet).
    """
    from components.retrieval.retrieve import retrieve_and_generate, retrieve_at_least

    check_sid_version(params)
    method = params["tokenizer"]["method"]
    beam = int(params["retriever"]["beam"])
    constrained = retrieve_at_least(params, test, max(params["eval"]["budgets"]), beam=beam)
    free, generated = retrieve_and_generate(params, test, beam=beam, constrained=False)
    sids = out_path(params, "sids")
    meta = json.loads((sids / "meta.json").read_text())
    sizes = [int(k) for k in meta["codebook_sizes"]][: int(meta["max_len"])]  # as retriever_data.load_inputs
    issued = issued_by_length(read_frame(sids / "sid_table.parquet", columns=["codes"])["codes"])
    halluc = hallucination_table(generated, int(params["eval"]["headline_k"]), sizes, issued)
    return {method: constrained, f"{method} (unconstrained)": free}, halluc


def headline(results: dict[str, dict], k: int) -> dict:
    """The few numbers `dvc metrics show` prints: per method, overall and per group."""
    keys = [h.format(k=k) for h in HEADLINE]
    out: dict[str, dict] = {}
    for method, res in results.items():
        row: dict[str, float] = {}
        for group in ("overall",) + GROUPS:
            for key in keys:
                stat = res[group]["metrics"].get(key)
                if stat is not None and stat["mean"] is not None:
                    row[key if group == "overall" else f"{key}_{group}"] = round(stat["mean"], 5)
        out[method.replace(" ", "_").replace("(", "").replace(")", "")] = row
    return out


def sid_section(params: dict) -> tuple[pd.DataFrame | None, dict[str, Path]]:
    """Table-2-style SID statistics row and the SID plots (made by assign_ids, or drawn here when missing)."""
    from components.evaluation.report import sid_stats_frame
    from components.tokenizers.sid_stats import plot_sid_stats, sid_statistics
    from components.tokenizers.sid_table import read_sid_table

    root = out_path(params)
    table_path = root / "sids" / "sid_table.parquet"
    if not table_path.exists():
        return None, {}
    items = read_frame(root / "prepared" / "items.parquet")
    table = read_sid_table(table_path)
    meta = json.loads((root / "sids" / "meta.json").read_text())
    plots = {"SID length by group": root / "plots" / "sid_lengths.png",
             "Items per SID": root / "plots" / "items_per_sid.png"}
    if not all(p.exists() for p in plots.values()):
        plots = {"SID length by group": root / "report" / "sid_lengths.png",
                 "Items per SID": root / "report" / "items_per_sid.png"}
        plot_sid_stats(table, items, *plots.values())
    return sid_stats_frame({params["tokenizer"]["method"]: sid_statistics(table, items, meta)}), plots


def log_to_wandb(params: dict, summary: dict, tables: dict[str, pd.DataFrame], plots: dict[str, Path],
                 job: str = "evaluate") -> None:
    """Log headline numbers, tables and plots to W&B (offline by default; WANDB_MODE=disabled skips)."""
    if os.environ.get("WANDB_MODE") == "disabled" or params["wandb"]["mode"] == "disabled":
        return
    import wandb

    run_dir = wandb_dir(params)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=params["wandb"]["project"], mode=params["wandb"]["mode"], dir=str(run_dir), job_type=job,
                     name=f"{job}-{params['dataset']}-{params['tokenizer']['method']}-{params_hash(params)}",
                     config={k: v for k, v in params.items() if not k.startswith("_")})
    try:
        run.summary.update({f"{m}/{k}": v for m, row in summary.items() for k, v in row.items()})
        logged = {f"table/{slug(name)}": wandb.Table(dataframe=frame.reset_index()) for name, frame in tables.items()}
        logged.update({f"plot/{slug(name)}": wandb.Image(str(path)) for name, path in plots.items()})
        run.log(logged)
    finally:
        run.finish()


def evaluate_method(params: dict, name: str, frame: pd.DataFrame, data: EvalInputs,
                    hallucination: pd.Series | None = None, depth: int | None = None) -> tuple[dict, pd.DataFrame]:
    """Metrics with CIs and popularity-decile recall for one method's ranked results.

    With eval.exclude_history, each query's history items are removed first (then cut to `depth`).
    """
    ev = params["eval"]
    if ev.get("exclude_history"):
        frame = drop_history_items(frame, data.test, depth)
    ks = [int(k) for k in ev["ks"]]
    deep = sorted({int(k) for k in list(ev["deep_ks"]) + list(ev["budgets"])} - set(ks))
    result = evaluate_ranked(frame, data.test, data.items, ks, deep, n_boot=int(ev["bootstrap"]),
                             seed=int(params["seed"]), hallucination=hallucination,
                             source=f"ranked results of {name}", budgets=[int(k) for k in ev["budgets"]])
    return result, recall_by_popularity_decile(frame, data.test, data.items, int(ev["headline_k"]))


def evaluate_all(params: dict, data: EvalInputs, baselines: list[str], generative: bool = True
                 ) -> tuple[dict[str, dict], dict[str, pd.DataFrame]]:
    """The generative retriever (constrained, unconstrained) and the baselines, one ranked frame in memory at a time."""
    results: dict[str, dict] = {}
    deciles: dict[str, pd.DataFrame] = {}
    if generative:
        ranked, halluc = run_generative(params, data.test)
        for name, frame in ranked.items():
            free = name.endswith("(unconstrained)")
            results[name], deciles[name] = evaluate_method(params, name, frame, data, halluc if free else None)
        del ranked
    for name in baselines:
        frame = run_baseline(name, params, data)
        if frame is None:  # not applicable here (SASRec without histories); run_baseline logged why
            continue
        label = baseline_label(name)
        results[label], deciles[label] = evaluate_method(params, label, frame, data, depth=eval_depth(params))
    return results, deciles


def result_tables(params: dict, results: dict) -> dict[str, pd.DataFrame]:
    """Overall table (every metric, with CIs) and per-group table (headline metrics) for the report."""
    from components.evaluation.report import metric_order, results_frame

    k = int(params["eval"]["headline_k"])
    names = metric_order([m for res in results.values() for m in res["overall"]["metrics"]])
    by_group = [f"recall@{k}", f"ndcg@{k}", "recall@all", "ret_per"]
    return {
        "Results on the test split (overall, 95% CI)": results_frame(results, names, ["overall"]),
        "Results by target group": results_frame(results, by_group, ["overall", *GROUPS], ci=False),
    }


def run_evaluate(params: dict) -> dict:
    """Evaluate the pipeline's retriever (constrained + unconstrained) and the baselines on the test split."""
    from components.evaluation.report import plot_recall_by_decile, plot_recall_vs_k, write_report

    set_offline_defaults()
    import torch

    torch.set_num_threads(int(params["eval"].get("threads", 2)))
    check_eval_params(params)
    ev = params["eval"]
    root = out_path(params)
    data = load_eval_inputs(params)
    results, deciles = evaluate_all(params, data, list(ev["baselines"]))
    k = int(ev["headline_k"])
    summary = headline(results, k)

    plots = {"Recall vs K": plot_recall_vs_k(results, root / "plots" / "eval_recall_vs_k.png"),
             f"Recall@{k} by popularity decile": plot_recall_by_decile(deciles, k, root / "plots" /
                                                                        "eval_recall_by_decile.png")}
    tables = result_tables(params, results)
    sid_frame, sid_plots = sid_section(params)
    if sid_frame is not None:
        tables["Semantic IDs (as the paper's Table 2)"] = sid_frame
    plots.update(sid_plots)
    counts = next(iter(results.values()))
    context = {"dataset": params["dataset"], "profile": params.get("profile", "default"),
               "tokenizer": params["tokenizer"]["method"],
               "test queries": ", ".join(f"{g} {counts[g]['n_queries']}" for g in ("overall",) + GROUPS),
               "beam": str(params["retriever"]["beam"]), "baseline depth": str(eval_depth(params)),
               "history items excluded": str(bool(ev.get("exclude_history"))),
               "bootstrap resamples": str(ev["bootstrap"]), "params hash": params_hash(params)}
    write_json({"methods": results, "context": context}, root / "eval" / "results.json")
    write_json({m: f.to_dict(orient="list") for m, f in deciles.items()}, root / "eval" / "deciles.json")
    write_json(summary, root / "metrics" / "eval.json")
    report = write_report(root / "report", context, tables, plots)
    log_to_wandb(params, summary, tables, plots)
    return {"methods": list(results), "report": report, "headline": summary}

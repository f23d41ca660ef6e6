"""Tokenizer variants side by side (the paper's Tables 1 and 2), over several seeds: the work of one run.

Each (variant, seed) trains (train_head, train_tail, assign_ids, train_retriever) in its own
scratch out_dir (<out_dir>/<eval.compare_dir>/<variant>/seed<k>, with prepared/ and embeddings/
linked from the set's out_dir), then its generative retriever is evaluated constrained (recall,
Ret-Per) and unconstrained (hallucination) into eval/compare_run.json. Baselines are evaluated
once (per seed for the trained ones, two-tower and SASRec) into <compare_dir>/baselines/; one that
does not apply (SASRec on a search dataset) stores a null result, and its row keeps its place in every
table and file, without values, noted why (its registration's `skipped`). `aggregate`
reads what the runs stored and writes the tables. Which run is stale is DVC's call
(experiments/dvc.yaml, flows/compare_dvc.py): the *_keys functions below say which params
each run reads, and those are its DVC params.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd

from components.baselines.registry import baseline_label, baselines, get_baseline
from components.evaluation.evaluate import check_eval_params, evaluate_all, load_eval_inputs, log_to_wandb, slug
from components.evaluation.recall_curve import recall_at_k_figure
from components.evaluation.report import metric_label, sid_stats_row
from components.evaluation.results_file import catalog_name, input_digests, results_name, write_results_file
from components.evaluation.training_curves import gather_curves, write_curves
from components.ranking.metrics import GROUPS
from components.runtime.atomic import atomic_path, write_json
from components.runtime.config import deep_merge
from components.runtime.errors import ConfigError
from components.runtime.locks import lock_out_dir
from components.runtime.paths import out_path
from components.runtime.runtime_env import set_offline_defaults
from components.tokenizers.registry import methods as tokenizer_methods

TRAIN_STEPS = ("train_head", "train_tail", "assign_ids", "train_retriever")
LINKED = ("prepared", "embeddings")
# eval keys that pick what to compare; a finished variant run does not depend on them (nor on the keys the
# baselines read: not_run_keys)
COMPARISON_KEYS = ("variants", "seeds", "compare_dir", "baselines", "threads", "results_dir")
# top-level sections that never change a result: where, logging, operations, serving
OPERATIONAL_KEYS = ("out_dir", "wandb", "flows", "serve")
# embed settings that only decide how vectors are cached, not what they are
NOT_RUN_EMBED_KEYS = ("cache", "cache_every_batches")
# settings that only name what a comparison covers (its results file, plots, title): no run reads them, so
# naming a catalog reruns its aggregate alone
NAMING_KEYS = (("data", "generic", "name"),)


def table_metrics(params: dict) -> list[str]:
    """Columns of the comparison: hallucination (all beams, top headline_k beams, over chance), recall at
    every K, NDCG@headline_k, MRR@headline_k, recall@all, Ret-Per, and reach@K per budget (the share of
    queries given K items)."""
    ev = params["eval"]
    ks = sorted({int(k) for k in list(ev["ks"]) + list(ev["deep_ks"]) + list(ev["budgets"])})
    k = int(ev["headline_k"])
    return (["hallucination", f"hallucination@{k}", "hallucination_norm"] + [f"recall@{k}" for k in ks]
            + [f"ndcg@{k}", f"mrr@{k}", "recall@all", "ret_per"] + [f"reach@{b}" for b in ev["budgets"]])


def _rows(method: str, seed: int, result: dict, hallucination: dict | None) -> list[dict]:
    """Long-format rows (one per group) for one method and seed; the hallucination metrics come from
    the unconstrained result `hallucination` (None for a baseline)."""
    rows = []
    for group in ("overall",) + GROUPS:
        metrics = {k: v["mean"] for k, v in result[group]["metrics"].items()}
        if hallucination is not None:
            metrics.update({k: v["mean"] for k, v in hallucination[group]["metrics"].items()
                            if k.startswith("hallucination")})
        rows.append({"method": method, "group": group, "seed": seed, "n_queries": result[group]["n_queries"],
                     **metrics})
    return rows


# Settings added after runs were cached, at the value that reproduces the behaviour before they
# existed: left out of the run key, so adding a switch does not invalidate finished runs.
# (the tokenizer's: each method's registration, tokenizer_tables())
EARLIER_BEHAVIOUR = {("retriever", "item_head"): False, ("retriever", "fusion"): {"sources": "none"},
                     ("retriever", "item_head_encoder"): "shared", ("retriever", "cold_item_rows"): "learned",
                     ("retriever", "trainer", "num_nodes"): 1}
# the same for the baselines' keys
BASELINE_EARLIER_BEHAVIOUR = {("eval", "two_tower", "accelerator"): "auto", ("retriever", "trainer", "num_nodes"): 1}
# keys read only when a switch is on: key path -> (switch path, test of the switch's value for "on")
READ_ONLY_WHEN = {("retriever", "item_head_weight"): (("retriever", "item_head"), bool),
                  ("retriever", "item_head_encoder"): (("retriever", "item_head"), bool),
                  ("retriever", "cold_item_rows"): (("retriever", "item_head"), bool)}
# keys split off another later, left out of the run key while they equal it (the behaviour before the split)
SPLIT_FROM = {("retriever", "fusion", "beam"): ("retriever", "beam")}


def tokenizer_tables() -> tuple[tuple[str, ...], dict, dict]:
    """From the tokenizer methods' registrations (components/tokenizers/registry.py): the method-specific
    keys (any method's `keys`: what it alone reads), and the EARLIER_BEHAVIOUR and READ_ONLY_WHEN entries
    under `tokenizer`."""
    registered = tokenizer_methods().values()
    specific = tuple(dict.fromkeys(k for m in registered for k in m.keys))
    earlier = {("tokenizer", *path): v for m in registered for path, v in m.earlier_behaviour.items()}
    only_when = {("tokenizer", *path): (("tokenizer", *switch), is_on)
                 for m in registered for path, (switch, is_on) in m.read_only_when.items()}
    return specific, earlier, only_when


def _get(tree: dict, path: tuple[str, ...]) -> object:
    for part in path:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _public(p: dict) -> dict:
    """The params without private bookkeeping (`_profile`, `_params_path`) and the profile blocks:
    params are resolved, so the chosen profile is already in every section it overlays."""
    return {k: v for k, v in p.items() if not k.startswith("_") and k not in ("profile", "profiles")}


def _drop_earlier_behaviour(kept: dict, earlier: dict[tuple[str, ...], object]) -> None:
    """Remove from `kept` (in place) each setting at its earlier-behaviour value (a dict value:
    when the setting holds at least those entries)."""
    for path, value in earlier.items():
        parent = _get(kept, path[:-1])
        if not isinstance(parent, dict):
            continue
        current = parent.get(path[-1], value)
        if current == value or (isinstance(value, dict) and isinstance(current, dict)
                                and all(current.get(k) == v for k, v in value.items())):
            parent.pop(path[-1], None)


def drop_naming(kept: dict) -> dict:
    """`kept` (a copy of params, or part of one from the top) without NAMING_KEYS, changed in place."""
    for path in NAMING_KEYS:
        parent = _get(kept, path[:-1])
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    return kept


def run_params_key(p: dict) -> dict:
    """The params one variant run depends on (seed included), so adding or dropping variants keeps finished runs.

    Tokenizer settings the variant's method never reads (the SARQ block for fixed-length methods,
    extension rows and Stage-2 options for one-stage methods), settings behind a switch that is
    off, and new switches at the value that reproduces earlier runs are left out: tuning SA2CRQ does
    not retrain TIGER."""
    kept = copy.deepcopy({k: v for k, v in _public(p).items() if k not in OPERATIONAL_KEYS})
    kept["eval"] = {k: v for k, v in p["eval"].items() if k not in not_run_keys()}
    kept["embed"] = {k: v for k, v in p.get("embed", {}).items() if k not in NOT_RUN_EMBED_KEYS}
    specific, tok_earlier, tok_only_when = tokenizer_tables()
    method = tokenizer_methods().get(p["tokenizer"].get("method"))
    unread = set(specific) - set(method.keys if method is not None else ())
    kept["tokenizer"] = {k: v for k, v in p["tokenizer"].items() if k not in unread}
    kept["retriever"] = copy.deepcopy(p["retriever"])
    _drop_earlier_behaviour(kept, {**EARLIER_BEHAVIOUR, **tok_earlier})
    drop_naming(kept)
    for path, (switch, is_on) in {**READ_ONLY_WHEN, **tok_only_when}.items():
        parent = _get(kept, path[:-1])
        if isinstance(parent, dict) and not is_on(_get(p, switch)):
            parent.pop(path[-1], None)
    for path, source in SPLIT_FROM.items():
        parent = _get(kept, path[:-1])
        if isinstance(parent, dict) and parent.get(path[-1]) == _get(p, source):
            parent.pop(path[-1])
    return kept


def variant_keys(p: dict) -> dict:
    """What a variant's training reads, for every seed (the seed is the run's own, in its stage name)."""
    return {k: v for k, v in run_params_key(p).items() if k not in ("seed", "eval")}


def eval_keys(p: dict) -> dict:
    """The eval settings a variant run's evaluation reads (the same for every variant of a comparison)."""
    return run_params_key(p)["eval"]


def variant_params(params: dict, variant: dict, seed: int) -> dict:
    """The variant's params for one seed, writing into its own scratch out_dir."""
    if "name" not in variant:
        raise ConfigError("eval.variants", f"every variant needs a name, got {variant}")
    p = deep_merge(params, variant.get("params") or {})
    p["seed"] = int(seed)
    p["out_dir"] = str(out_path(params, params["eval"]["compare_dir"], slug(variant["name"]), f"seed{seed}"))
    return p


def _link_inputs(params: dict, scratch: Path) -> None:
    """Point the scratch run at the set's prepared data and embeddings."""
    scratch.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        src, dst = out_path(params, name).resolve(), scratch / name
        if not src.exists():
            raise FileNotFoundError(f"{src}: missing (run the prepare and embed steps first)")
        if dst.is_symlink() and dst.resolve() == src:
            continue
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(src, target_is_directory=True)


def train_variant(params: dict, variant: dict, seed: int) -> None:
    """Train one variant for one seed in its scratch folder (the compare_train stage)."""
    from components.pipeline.stages import get_step

    p = variant_params(params, variant, seed)
    _link_inputs(params, Path(p["out_dir"]))
    for step in TRAIN_STEPS:
        get_step(step)(p)


def evaluate_variant(params: dict, variant: dict, seed: int) -> dict:
    """Evaluate a trained variant run (constrained and unconstrained) into eval/compare_run.json
    (the compare_evaluate stage)."""
    from components.tokenizers.sid_stats import sid_statistics
    from components.tokenizers.sid_table import read_sid_table

    p = variant_params(params, variant, seed)
    scratch = Path(p["out_dir"])
    _link_inputs(params, scratch)
    with lock_out_dir(p):
        data = load_eval_inputs(p)
        results, _ = evaluate_all(p, data, [])
        names = list(results)
        meta = json.loads((scratch / "sids" / "meta.json").read_text())
        stats = sid_statistics(read_sid_table(scratch / "sids" / "sid_table.parquet"), data.items, meta)
        out = {"name": variant["name"], "seed": int(seed),
               "constrained": results[names[0]], "unconstrained": results[names[1]], "sid_stats": stats}
        write_json(out, scratch / "eval" / "compare_run.json")
    return out


def _aggregate(long: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Mean and std over seeds per (method, group); columns '<metric>' and '<metric> std'."""
    cols = [m for m in metrics if m in long.columns]
    grouped = long.groupby(["method", "group"], sort=False)[cols]
    mean, std = grouped.mean(), grouped.std(ddof=1)
    table = mean.join(std.add_suffix(" std"))
    table["seeds"] = long.groupby(["method", "group"], sort=False)["seed"].nunique()
    return table[[c for m in cols for c in (m, f"{m} std")] + ["seeds"]]


# retriever settings of the generative ranking alone: no baseline reads them (two-tower reads the query-encoder shape)
GENERATIVE_RANKING_KEYS = ("item_head", "item_head_weight", "item_head_encoder", "fusion")


def not_run_keys() -> tuple[str, ...]:
    """eval keys a finished variant run does not depend on: the comparison's own and every key a registered
    baseline reads (components/baselines/registry.py)."""
    return COMPARISON_KEYS + tuple(key for b in baselines().values() for key in b.reads)


def seeded(name: str) -> bool:
    """Whether a baseline trains with the run's seed (its registration): then it runs once per seed, else once."""
    return get_baseline(name).seeded


def baseline_file(params: dict, name: str, seed: int) -> Path:
    """Where one baseline result lives: seeded baselines per seed, the others once."""
    folder = out_path(params, params["eval"]["compare_dir"], "baselines")
    return folder / (f"{name}-seed{seed}.json" if seeded(name) else f"{name}.json")



def baseline_keys(params: dict, name: str) -> dict:
    """The params one baseline reads (its seed aside): every param but the tokenizer's, the generative
    ranking's (but those it declares in reads_retriever) and the comparison's bookkeeping, so a baseline is
    shared by every variant."""
    baseline = get_baseline(name)
    kept = copy.deepcopy({k: v for k, v in _public(params).items() if k not in OPERATIONAL_KEYS + ("tokenizer", "seed")})
    kept["retriever"] = {k: v for k, v in kept["retriever"].items()
                         if k not in GENERATIVE_RANKING_KEYS or k in baseline.reads_retriever}
    kept["embed"] = {k: v for k, v in params.get("embed", {}).items() if k not in NOT_RUN_EMBED_KEYS}
    own = baseline.reads
    kept["eval"] = {k: v for k, v in kept["eval"].items()
                    if k in own or k not in not_run_keys() + ("results_dir", "group_order")}
    _drop_earlier_behaviour(kept, BASELINE_EARLIER_BEHAVIOUR)
    return drop_naming(kept)


def run_baseline(params: dict, name: str, seed: int) -> dict | None:
    """Evaluate one baseline for one seed and store it (the compare_baseline stage); None = not
    applicable to the dataset (SASRec without histories), stored as such."""
    p = deep_merge(params, {"seed": int(seed)})
    # no out_dir lock: baselines of one comparison run side by side (`sa2crq compare --jobs`), each its own file
    result = evaluate_all(p, load_eval_inputs(params), [name], generative=False)[0].get(baseline_label(name))
    write_json({"name": baseline_label(name), "result": result}, baseline_file(params, name, seed))
    return result


def _stored(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (`sa2crq compare` runs the comparison's stages)")
    return json.loads(path.read_text())


def collect_runs(params: dict, variants: list[dict], seeds: list[int]
                 ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """Long results (one row per method, group and seed) from the stored variant runs and baselines,
    SID statistics rows, and the baseline rows asked for that no seed could run, with their note (SASRec
    without histories: "skipped: ..."). Unseeded baselines were evaluated once, with the first seed."""
    rows: list[dict] = []
    sid_rows: list[dict] = []
    skipped: dict[str, str] = {}
    for variant in variants:
        for seed in seeds:
            run = _stored(Path(variant_params(params, variant, seed)["out_dir"]) / "eval" / "compare_run.json")
            rows += _rows(variant["name"], seed, run["constrained"], run["unconstrained"])
            sid_rows.append({"config": variant["name"], "seed": seed, **sid_stats_row(run["sid_stats"])})
    for seed in seeds:
        for name in params["eval"]["baselines"]:
            result = _stored(baseline_file(params, name, seed if seeded(name) else seeds[0]))["result"]
            if result is not None:
                rows += _rows(baseline_label(name), seed, result, None)
            else:                   # not applicable to the dataset (SASRec without histories)
                skipped[baseline_label(name)] = get_baseline(name).skipped_note
    ran = {row["method"] for row in rows}
    return pd.DataFrame(rows), pd.DataFrame(sid_rows), {m: note for m, note in skipped.items() if m not in ran}


def with_skipped(table: pd.DataFrame, skipped: dict[str, str], order: list[str]) -> pd.DataFrame:
    """The table with a row for each method asked for that did not run: overall only, no values, 0 seeds,
    and a `note` column saying why, every row in the order the methods were asked for. Unchanged when none
    was skipped."""
    if not skipped:
        return table
    ran = list(dict.fromkeys(table.index.get_level_values(0)))
    methods = [m for m in order if m in ran or m in skipped] + [m for m in ran if m not in order]
    index = [key for m in methods for key in (table.loc[[m]].index if m in ran else [(m, "overall")])]
    out = table.reindex(pd.MultiIndex.from_tuples(index, names=["method", "group"]))
    out["seeds"] = out["seeds"].fillna(0).astype(int)
    out["note"] = [skipped.get(m) for m, _ in out.index]
    return out


def _summary_row(row: pd.Series) -> dict:
    """One row of summary.json: each metric a float or null, and a skipped row's note."""
    out = {k: (None if pd.isna(v) else float(v)) for k, v in row.items() if k != "note"}
    if isinstance(row.get("note"), str):
        out["note"] = row["note"]
    return out


def _mean_std(mean: pd.Series, std: pd.Series, digits: int) -> list[str]:
    return ["-" if pd.isna(a) else f"{a:.{digits}f}" + ("" if pd.isna(b) else f" ± {b:.{digits}f}")
            for a, b in zip(mean.to_numpy(), std.to_numpy())]


def headline_table(table: pd.DataFrame, k: int) -> pd.DataFrame:
    """One row per method: Recall@k overall and by group, hallucination (all beams, top k beams, over
    chance), Ret-Per (mean ± std over seeds)."""
    methods = list(dict.fromkeys(table.index.get_level_values(0)))
    out = pd.DataFrame(index=pd.Index(methods, name="method"))
    metric = f"recall@{k}"
    for group in ("overall",) + GROUPS:
        part = table.xs(group, level="group").reindex(methods)
        out[f"R@{k} {group}"] = _mean_std(part[metric], part[f"{metric} std"], 4)
    overall = table.xs("overall", level="group").reindex(methods)
    for m, digits in (("hallucination", 4), (f"hallucination@{k}", 4), ("hallucination_norm", 4), ("ret_per", 1)):
        if m in overall.columns:
            out[metric_label(m)] = _mean_std(overall[m], overall[f"{m} std"], digits)
    out["seeds"] = overall["seeds"].to_numpy()
    if "note" in overall.columns:
        out["note"] = overall["note"].fillna("").to_numpy()
    return out


def results_markdown(table: pd.DataFrame, sid_table: pd.DataFrame, params: dict) -> str:
    """RESULTS-style Markdown: the headline table, Table 1 (mean ± std over seeds, by group) and Table 2 (SIDs)."""
    ev = params["eval"]
    metrics = [c for c in table.columns if not c.endswith(" std") and c not in ("seeds", "note")]
    cells = pd.DataFrame(index=[m if g == "overall" else f"({g})" for m, g in table.index])
    for m in metrics:
        cells[metric_label(m)] = _mean_std(table[m], table[f"{m} std"], 1 if m == "ret_per" else 4)
    cells["seeds"] = table["seeds"].to_numpy()
    if "note" in table.columns:
        cells["note"] = table["note"].fillna("").to_numpy()
    depth = max(list(ev["ks"]) + list(ev.get("deep_ks") or []))
    lines = [f"# Tokenizer comparison on {dataset_title(params)}", "",
             f"Test split, item level; mean ± std over seeds {list(ev['seeds'])}; retriever beam "
             f"{params['retriever']['beam']}; Hallu = share of SIDs from unconstrained decoding that match no item; "
             f"baselines return {depth} items; rows '(group)' hold the queries whose target is in that group.", "",
             f"## Headline: Recall@{int(ev['headline_k'])} by target group", "",
             headline_table(table, int(ev["headline_k"])).to_markdown(), "",
             "## Table 1: retrieval", "", cells.rename_axis("method").to_markdown(), ""]
    if len(sid_table):
        sid_mean = sid_table.drop(columns=["seed"]).groupby("config", sort=False).agg(
            lambda s: round(float(s.mean()), 4) if pd.api.types.is_numeric_dtype(s) else s.iloc[0])
        lines += ["## Table 2: semantic IDs (mean over seeds)", "", sid_mean.to_markdown(), ""]
    return "\n".join(lines)


def results_file(params: dict) -> Path:
    """Where the full comparison's headline rows go: <eval.results_dir>/<results_name>.json."""
    return Path(str(params["eval"].get("results_dir") or "results")) / f"{results_name(params)}.json"


def curves_file(results: Path) -> Path:
    """The training curves' figure beside a results file: <name>-curves.png."""
    return results.with_name(f"{results.stem}-curves.png")


def recall_file(results: Path) -> Path:
    """The Recall@K-against-K figure beside a results file: <name>-recall-at-k.png."""
    return results.with_name(f"{results.stem}-recall-at-k.png")


def aggregate(params: dict, variants: list[dict], seeds: list[int], command: str,
              results: Path | None = None) -> pd.DataFrame:
    """Mean and std over seeds per (method, group) for every stored variant run and baseline (the
    compare_aggregate stage); `command` is the one the results file names.

    Writes <out_dir>/<eval.compare_dir>/: results.md (Tables 1 and 2), summary.csv, summary.json
    (overall rows), results_long.csv (every seed), sid_stats.csv, curves.csv / curves.png (validation
    Recall@10 per epoch), and the results file `results` (default: results_file) with <name>-curves.png and
    <name>-recall-at-k.png (Recall@K against K) beside it. The DVC plan passes a subset comparison's own file,
    so it never replaces the full one's. A baseline asked for that did not apply keeps its row (with_skipped).
    """
    set_offline_defaults()
    check_eval_params(params)
    if not variants and not params["eval"]["baselines"]:
        raise ConfigError("eval.variants", "no variants and no baselines to compare")
    seeds = [int(s) for s in seeds]
    long, sid_frame, skipped = collect_runs(params, variants, seeds)
    if long.empty:
        notes = "; ".join(f"{m} ({note})" for m, note in skipped.items())
        raise ConfigError("eval.baselines", f"no row to compare: {notes}")
    asked = [v["name"] for v in variants] + [baseline_label(n) for n in params["eval"]["baselines"]]
    table = with_skipped(_aggregate(long, table_metrics(params)), skipped, asked)
    root = out_path(params, params["eval"]["compare_dir"])
    with lock_out_dir(params):
        with atomic_path(root / "results.md") as tmp:
            tmp.write_text(results_markdown(table, sid_frame, params))
        for name, frame in (("results_long", long), ("summary", table.reset_index()), ("sid_stats", sid_frame)):
            with atomic_path(root / f"{name}.csv") as tmp:
                frame.to_csv(tmp, index=False)
        overall = {m: _summary_row(row) for m, row in table.xs("overall", level="group").iterrows()}
        write_json(overall, root / "summary.json")
        results = write_results_file(table, params, seeds, command, input_digests(params),
                                     path=results or results_file(params))
        curves = write_curves(gather_curves([(v["name"], s, Path(variant_params(params, v, s)["out_dir"]))
                                             for v in variants for s in seeds]), root)
        with atomic_path(curves_file(results)) as tmp:
            tmp.write_bytes(curves["png"].read_bytes())
        recall_at_k_figure(table, recall_file(results), list(params["eval"]["budgets"]))
    log_to_wandb(params, {m: {k: v for k, v in row.items() if v is not None} for m, row in overall.items()},
                 {"comparison": table.reset_index(), "sid_stats": sid_frame}, {}, job="compare")
    return table


def pick_variants(variants: list[dict], names: str | None) -> list[dict]:
    """The eval.variants rows named in `names` (comma-separated; None = all, 'none' = no variant)."""
    if names is None:
        return variants
    wanted = [n.strip() for n in names.split(",") if n.strip() and n.strip().lower() != "none"]
    known = {v.get("name"): v for v in variants}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ConfigError("eval.variants", f"no variant named {unknown}; known: {list(known)}")
    return [known[n] for n in wanted]


def dataset_title(params: dict) -> str:
    """The dataset's name, and for a user's own catalog its name and the files it came from."""
    if params["dataset"] != "generic":
        return params["dataset"]
    files = params["data"]["generic"]
    return f"{catalog_name(params)} (generic catalog: {Path(files['items']).name}, {Path(files['queries']).name})"

"""Flow: a grid of params points on DVC, gathered into one table.

`sa2crq sweep --grid tokenizer.sarq.tau=[3,6] --grid seed=[0,1]` calls
`sweep_flow(params=..., opt_grid=[...])`. The grid is a comparison (flows/compare_dvc.py): each point
(its values but the seed) is a variant whose params are the point's overrides, and the `seed` axis (else
params' seed) is the comparison's seeds, with no baselines. It is planned as the set '<set>__sweep' in
experiments/scratch/ (never the committed plan or its lock), its runs in <out_dir>/sweep/points/<point>/seed<k>/
(prepared/ and embeddings/ linked from out_dir: a grid over dataset / profile / data.* / embed.* needs an
out_dir per value), and the flow's one task runs `dvc repro` of it, flows.max_workers runs at a time
(as `sa2crq compare --jobs`; flows.task_runner only says where that task runs). DVC decides what runs: a
killed sweep resumes where it stopped, a point run before (same run params, the same stage) does not
train again, and a new grid value trains only its points.
Results: <out_dir>/sweep/results.parquet (grid values + every metric of each point's metrics/*.json and
its evaluation, eval.constrained.* / eval.unconstrained.*) and results.md (the metrics matching
flows.sweep.report); <out_dir>/sweep/points/results.md is the comparison's own table.
"""
from __future__ import annotations

import fnmatch
import itertools
import json
import shlex
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from components.evaluation.evaluate import headline
from components.runtime.atomic import atomic_path, write_parquet
from components.runtime.config import DEFAULT_PARAMS, deep_merge, load_params, override_layer, parse_value
from components.runtime.errors import ConfigError, Sa2crqError
from components.runtime.paths import out_path
from flows import compare_dvc
from flows.compare import variant_params
from flows.flow_params import apply_overrides, flow_run_name
from flows.tracking import flatten, numeric

UPSTREAM = ("dataset", "profile", "data", "embed")   # keys that change prepared/ or embeddings/
SWEEP_DIR = "sweep"                                   # <out_dir>/sweep/: the table; points/: the runs
DEFAULT_REPORT = ["sid_stats.n_sids", "sid_stats.unique_share", "sid_stats.items_per_sid.mean",
                  "sid_stats.length.*.mean", "retriever_train.best_val_recall@10", "eval.*.recall@10"]


def parse_grid(grid: list[str]) -> list[tuple[str, list]]:
    """['a.b=[1,2]', 'c=3'] -> [('a.b', [1, 2]), ('c', [3])] (values parsed as YAML)."""
    axes = []
    for text in grid:
        if "=" not in text:
            raise ConfigError("sweep --grid", f"{text!r} must look like key.path=[v1,v2]")
        key, raw = text.split("=", 1)
        values = parse_value(raw, f"sweep --grid {key.strip()}")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ConfigError(f"sweep --grid {key}", "needs at least one value")
        axes.append((key.strip(), values))
    if not axes:
        raise ConfigError("sweep --grid", "give at least one --grid key=[values]")
    return axes


def grid_points(axes: list[tuple[str, list]]) -> list[dict[str, Any]]:
    """Cartesian product, first axis slowest."""
    keys = [k for k, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in axes))]


def point_overrides(point: dict[str, Any]) -> list[dict]:
    """A point's values as override layers: no text round trip (a swept .inf stays a float)."""
    return [override_layer(k, v) for k, v in point.items()]


def point_name(point: dict[str, Any]) -> str:
    """A folder name that says what the point is: `tokenizer.sarq.tau=3,seed=0`."""
    text = ",".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.items())
    return "".join(c if c.isalnum() or c in "._=,+-" else "_" for c in text)


def task_runner(params: dict):
    """ThreadPoolTaskRunner (default) or a DaskTaskRunner, from params flows.*."""
    cfg = params.get("flows", {})
    kind = cfg.get("task_runner", "threads")
    workers = int(cfg.get("max_workers", 2))
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        address = str(cfg.get("dask_address") or "")
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
    raise ConfigError("flows.task_runner", f"must be threads or dask, got {kind!r}")


def collect_metrics(point_dir: Path, k: int = 10) -> dict[str, float]:
    """Every number of the run's metrics/*.json, keyed `<file stem>.<path>`, and its evaluation
    (eval/compare_run.json) as `eval.constrained.*` / `eval.unconstrained.*` (evaluate's headline keys)."""
    row: dict[str, float] = {}
    for path in sorted((point_dir / "metrics").glob("*.json")):
        row.update({f"{path.stem}.{k}": v for k, v in numeric(flatten(json.loads(path.read_text()))).items()})
    run = json.loads((point_dir / "eval" / "compare_run.json").read_text())
    scores = headline({"constrained": run["constrained"], "unconstrained": run["unconstrained"]}, k)
    row.update({f"eval.{k}": v for k, v in numeric(flatten(scores)).items()})
    return row


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _yaml_value(value: Any) -> str:
    """A value as override text that parse_value reads back equal (a .inf stays a float, '1e-3' a string)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**9).strip()[1:-1]


def base_overrides(params: dict) -> tuple[str, list[str]]:
    """The params file and the `key=value` overrides that give these params again: what the sweep's
    stages re-read (a stage loads the params file with its set's overrides, as `sa2crq compare` records -s)."""
    path = str(params.get("_params_path") or DEFAULT_PARAMS)
    overrides: list[str] = []
    ref = load_params(path)
    if params.get("_profile", ref.get("_profile")) != ref.get("_profile"):
        overrides = [f"profile={params['_profile']}"]
        ref = load_params(path, overrides)
    public = lambda tree: {k: v for k, v in tree.items() if not k.startswith("_") and k not in ("profile", "profiles")}  # noqa: E731
    theirs = _leaves(public(ref))
    overrides += [f"{name}={_yaml_value(value)}" for name, value in _leaves(public(params)).items()
                  if name not in theirs or theirs[name] != value]
    return path, overrides


def sweep_variants(points: list[dict[str, Any]]) -> tuple[list[dict], list[int]]:
    """The grid as a comparison: one variant per point without its seed (name: point_name, params: the
    point's overrides), and the seeds of the `seed` axis."""
    variants: dict[str, dict] = {}
    for point in points:
        values = {k: v for k, v in point.items() if k != "seed"}
        name = point_name(values) or "params"
        overlay: dict = {}
        for k, v in values.items():
            overlay = deep_merge(overlay, override_layer(k, v))
        if variants.setdefault(name, {"name": name, "params": overlay})["params"] != overlay:
            raise ConfigError("sweep --grid", f"two points are both named {name!r}; give values that differ in "
                                              "letters or digits")
    keys = [compare_dvc.key(name) for name in variants]
    if len(set(keys)) < len(keys):
        raise ConfigError("sweep --grid", f"two points get the same run folder ({keys}); give values that differ "
                                          "in letters or digits")
    seeds = list(dict.fromkeys(int(p["seed"]) for p in points if "seed" in p))
    return list(variants.values()), seeds


def plan_sweep(params: dict, grid: list[str]) -> tuple[str, dict, dict]:
    """Write the sweep's set into experiments/scratch/: its id, its params (as its stages read them) and its plan."""
    if not compare_dvc.DVC_FILE.exists():
        raise Sa2crqError(f"{compare_dvc.DVC_FILE}: missing (run `sa2crq sweep` from the project root: its points "
                          "are DVC stages)")
    axes = parse_grid(grid)
    upstream = [k for k, _ in axes if k.split(".")[0] in UPSTREAM]
    if upstream:
        raise ConfigError(f"sweep --grid {upstream[0]}", "changes prepared/ or embeddings/, which a sweep's points "
                                                         "share: sweep it with one `sa2crq sweep -s out_dir=... "
                                                         f"-s {upstream[0]}=...` per value")
    variants, seeds = sweep_variants(grid_points(axes))
    params_file, overrides = base_overrides(params)
    overrides += [f"eval.variants={_yaml_value(variants)}", f"eval.seeds={seeds or [int(params['seed'])]}",
                  "eval.baselines=[]", f"eval.compare_dir={SWEEP_DIR}/points"]
    set_params = load_params(params_file, overrides)
    command = shlex.join(["sa2crq", "sweep", *(x for g in grid for x in ("--grid", g))])
    sid, entries = compare_dvc.plan_set(set_params, params_file, overrides, variants, command, subset=True,
                                        suffix=compare_dvc.SWEEP)
    compare_dvc.write_plan(sid, entries)
    return sid, set_params, compare_dvc.read_plan(compare_dvc.plan_files(sid))


@task(name="sweep-dvc-repro", cache_policy=NO_CACHE)
def repro_task(sid: str, plan: dict, jobs: int) -> int:
    """`dvc repro` of the sweep's set (`jobs` runs at a time): the stages that ran."""
    if jobs <= 1:
        return compare_dvc.repro(sid, plan)
    return compare_dvc.repro_parallel(sid, plan, jobs)


def report_markdown(table: pd.DataFrame, keys: list[str], patterns: list[str]) -> str:
    """Grid columns plus the metrics matching `patterns` (fnmatch), one row per point."""
    metrics = [c for c in table.columns if c not in keys and c != "point" and any(fnmatch.fnmatch(c, p) for p in patterns)]
    cols = ["point", *keys, *metrics]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table[cols].iterrows():
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


@flow(name="sweep", flow_run_name=flow_run_name)
def sweep_points_flow(params: dict, grid: list[str], overrides: list[str] | None = None) -> dict:
    """Plan the grid as a comparison, bring it up to date with DVC and gather the table."""
    params = apply_overrides(params, overrides)
    return run_sweep(params, grid)


def run_sweep(params: dict, grid: list[str]) -> dict:
    """The sweep flow's body: the set's stages, then results.parquet / results.md and the artifact."""
    axes = parse_grid(grid)
    points = grid_points(axes)
    keys = [k for k, _ in axes]
    sid, set_params, plan = plan_sweep(params, grid)
    runs = sum(item["set"] == sid for item in plan["runs"].values())
    jobs = min(int(params.get("flows", {}).get("max_workers", 2)), runs)
    ran = repro_task.with_options(task_run_name=f"repro-{sid}")(sid, plan, jobs)
    variants = {v["name"]: v for v in set_params["eval"]["variants"]}
    k = int(set_params["eval"]["headline_k"])
    rows = []
    for point in points:
        variant = variants[point_name({n: v for n, v in point.items() if n != "seed"}) or "params"]
        run_dir = Path(variant_params(set_params, variant, int(point.get("seed", params["seed"])))["out_dir"])
        rows.append({"point": point_name(point), **point, **collect_metrics(run_dir, k)})
    table = pd.DataFrame(rows)
    root = out_path(params, SWEEP_DIR)
    write_parquet(table, root / "results.parquet")
    report = list(params.get("flows", {}).get("sweep", {}).get("report") or DEFAULT_REPORT)
    markdown = report_markdown(table, keys, report)
    with atomic_path(root / "results.md") as tmp:
        tmp.write_text(f"# Sweep {sid}\n\nGrid: {' '.join(grid)}; {ran} stage(s) ran "
                       f"({compare_dvc.SCRATCH.plan}).\n\n" + markdown)
    create_markdown_artifact(markdown=markdown, key="sweep-results", description=f"sweep {sid}")
    return {"sweep_id": sid, "dir": str(root), "n_points": len(points), "stages_run": ran,
            "results": str(root / "results.parquet"), "markdown": str(root / "results.md")}


def sweep_flow(params: dict, opt_grid: list[str], overrides: list[str] | None = None) -> dict:
    """The CLI entry: the sweep flow on the task runner that params flows.task_runner names."""
    params = apply_overrides(params, overrides)
    for point in grid_points(parse_grid(list(opt_grid))):  # a bad grid value stops before any point runs
        apply_overrides(params, point_overrides(point))
    return sweep_points_flow.with_options(task_runner=task_runner(params))(params=params, grid=list(opt_grid))

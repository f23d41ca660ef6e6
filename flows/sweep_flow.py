"""Flow: a grid of params points run in parallel, gathered into one table.

`sa2crq sweep --grid tokenizer.sarq.tau=[3,6] --grid seed=[0,1]` calls
`sweep_flow(params=..., opt_grid=[...])`. Each point is the pipeline with its overrides,
in its own out_dir <out_dir>/sweeps/<sweep id>/<point>/. Points that change nothing upstream
of the tokenizer share prepared/ and embeddings/: links to the base out_dir's folders as they
are (prepare and embed run there first only when they are missing); a grid over data.* /
embed.* / dataset / profile runs every step per point.

A point runs the pipeline flow in a process of its own, one point at a time per process,
reporting to the same Prefect server: its own random state (so a point gives the same numbers
however many run beside it; every step seeds itself), its own torch threads, and one W&B run
(grouped by the sweep). The task runner (params flows.task_runner) decides where: `threads`
(ThreadPoolTaskRunner; each task hands its point to a pool of flows.max_workers processes
forked from a server that imported the stack once) or `dask` (prefect_dask.DaskTaskRunner on
flows.dask_address, or a local cluster of flows.max_workers single-threaded worker
processes; the point runs in the worker, so remote workers need threads_per_worker=1 and
PREFECT_API_URL set to the same server).
Results: <sweep dir>/results.parquet (grid values + every metric, timings included) and
results.md (the metrics matching flows.sweep.report).
"""
from __future__ import annotations

import contextlib
import fnmatch
import itertools
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from components.runtime.atomic import atomic_path, write_parquet
from components.runtime.config import override_layer, params_hash, parse_value
from components.runtime.errors import ConfigError
from components.runtime.locks import lock_out_dir
from components.runtime.paths import out_path
from flows.flow_params import apply_overrides, flow_run_name
from flows.step_io import ROOT, dvc_project
from flows.tasks import run_steps
from flows.tracking import flatten, numeric

UPSTREAM = ("dataset", "profile", "data", "embed")   # keys that change prepared/ or embeddings/
SHARED = ("prepared", "embeddings")
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


def collect_metrics(point_dir: Path) -> dict[str, float]:
    """Every number of the point's metrics/*.json, keyed `<file stem>.<path>`."""
    row: dict[str, float] = {}
    for path in sorted((point_dir / "metrics").glob("*.json")):
        row.update({f"{path.stem}.{k}": v for k, v in numeric(flatten(json.loads(path.read_text()))).items()})
    return row


def _api_url() -> str:
    """The API of the server this flow reports to (also the temporary one), for point processes."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def _init_point_process(env: dict[str, str]) -> None:
    """Point processes report to the sweep's server and W&B group, offline like the parent.

    Prefect read its settings when the process imported it: reload them after setting the URL
    (or each point process would start a temporary server of its own)."""
    os.environ.update(env)
    from prefect.context import refresh_global_settings_context

    from components.runtime.runtime_env import set_offline_defaults

    set_offline_defaults(ROOT)
    refresh_global_settings_context()


def run_point(point_params: dict, start: str, stop: str) -> dict[str, float]:
    """One point: the pipeline flow in this process (output to <point>/point.log); its metrics."""
    from flows.pipeline_flow import pipeline_flow

    point_dir = Path(point_params["out_dir"])
    with atomic_path(point_dir / "params.json") as tmp:
        tmp.write_text(json.dumps(point_params, indent=2, sort_keys=True, default=str))
    with open(point_dir / "point.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        pipeline_flow(params=point_params, start=start, stop=stop)
    return collect_metrics(point_dir)


def point_context() -> multiprocessing.context.BaseContext:
    """forkserver with the flow stack preloaded: the server imports torch, Lightning and Prefect
    once, then each point process is a fresh fork of it (no threads inherited from this flow)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["flows.pipeline_flow"])
    return ctx


# sweep id -> its pool of point processes, for tasks on the threads runner (a dask worker is a process already)
_POOLS: dict[str, ProcessPoolExecutor] = {}


@task(name="sweep-point", cache_policy=NO_CACHE)
def point_task(point_params: dict, start: str, stop: str, sweep_id: str) -> dict[str, float]:
    """Run a point in one of the sweep's processes (threads runner) or in this dask worker."""
    pool = _POOLS.get(sweep_id)
    if pool is None:
        return run_point(point_params, start, stop)
    return pool.submit(run_point, point_params, start, stop).result()


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
    """Run every grid point (in parallel, per the flow's task runner) and gather the table."""
    params = apply_overrides(params, overrides)
    if dvc_project(params) is not None and shares_inputs(grid):
        # DVC brings the shared prepared/ + embeddings/ up to date first; its stages lock outputs/ themselves
        run_steps(params, ["prepare", "embed"])
    # the sweep folder and the shared prepared/ + embeddings/; each point locks its own folder
    with lock_out_dir(params):
        return run_sweep(params, grid)


def shares_inputs(grid: list[str]) -> bool:
    """Whether the points share the base out_dir's prepared/ + embeddings/ (no swept key changes them)."""
    return not any(key.split(".")[0] in UPSTREAM for key, _ in parse_grid(grid))


def run_sweep(params: dict, grid: list[str]) -> dict:
    """The sweep flow's body: points, then results.parquet / results.md and the artifact."""
    axes = parse_grid(grid)
    points = grid_points(axes)
    keys = [k for k, _ in axes]
    sweep_cfg = params.get("flows", {}).get("sweep", {}) or {}
    sweep_id = params_hash({**params, "grid": grid})
    root = out_path(params, "sweeps", sweep_id)
    shared = shares_inputs(grid)
    start = sweep_cfg.get("start", "train_head") if shared else "prepare"
    stop = sweep_cfg.get("stop", "evaluate")
    if shared and not all(out_path(params, part).exists() for part in SHARED):
        run_steps(params, ["prepare", "embed"])
    env = {"PREFECT_API_URL": _api_url(), "WANDB_RUN_GROUP": f"sweep-{sweep_id}"}
    workers = min(int(params.get("flows", {}).get("max_workers", 2)), len(points))
    if params.get("flows", {}).get("task_runner", "threads") == "threads":
        _POOLS[sweep_id] = ProcessPoolExecutor(max_workers=workers, mp_context=point_context(),
                                               initializer=_init_point_process, initargs=(env,))
    try:
        futures = []
        for point in points:
            point_params = apply_overrides(params, point_overrides(point))
            point_dir = (root / point_name(point)).resolve()
            point_dir.mkdir(parents=True, exist_ok=True)
            point_params["out_dir"] = str(point_dir)
            if shared:
                for part in SHARED:
                    if not (point_dir / part).exists():
                        os.symlink(out_path(params, part).resolve(), point_dir / part)
            futures.append(point_task.with_options(task_run_name=f"point-{point_name(point)}").submit(
                point_params, start, stop, sweep_id))
        results = [f.result() for f in futures]
    finally:
        pool = _POOLS.pop(sweep_id, None)
        if pool is not None:
            pool.shutdown()
    rows = [{"point": point_name(p), **p, **r} for p, r in zip(points, results)]
    table = pd.DataFrame(rows)
    write_parquet(table, root / "results.parquet")
    markdown = report_markdown(table, keys, list(sweep_cfg.get("report") or DEFAULT_REPORT))
    with atomic_path(root / "results.md") as tmp:
        tmp.write_text(f"# Sweep {sweep_id}\n\nGrid: {' '.join(grid)}; steps {start} -> {stop}.\n\n" + markdown)
    create_markdown_artifact(markdown=markdown, key="sweep-results", description=f"sweep {sweep_id}")
    return {"sweep_id": sweep_id, "dir": str(root), "n_points": len(points), "results": str(root / "results.parquet"),
            "start": start, "stop": stop}


def sweep_flow(params: dict, opt_grid: list[str], overrides: list[str] | None = None) -> dict:
    """The CLI entry: the sweep flow on the task runner that params flows.task_runner names."""
    params = apply_overrides(params, overrides)
    for point in grid_points(parse_grid(list(opt_grid))):  # a bad grid value stops before any point runs
        apply_overrides(params, point_overrides(point))
    return sweep_points_flow.with_options(task_runner=task_runner(params))(params=params, grid=list(opt_grid))

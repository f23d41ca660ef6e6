"""Flow: a grid of params points run in parallel, gathered into one table.

`sa2crq sweep --grid tokenizer.sarq.tau=[3,6] --grid seed=[0,1]` calls
`sweep_flow(params=..., opt_grid=[...])`. Each point is the pipeline with its overrides,
in its own out_dir <out_dir>/sweeps/<sweep id>/<point>/. Points that change nothing upstream
of the tokenizer share prepared/ and embeddings/: links to the base out_dir's folders as they
are (prepare and embed run there first only when they are missing); a grid over data.* /
embed.* / dataset / profile runs every step per point.

A point runs `python -m flows.pipeline_flow` in a fresh process, reporting to the same
Prefect server: its own random state (so a point gives the same numbers however many run
beside it), its own torch threads, and one W&B run (grouped by the sweep). The task runner
(params flows.task_runner) only decides where those processes start: `threads`
(ThreadPoolTaskRunner, flows.max_workers at a time) or `dask` (prefect_dask.DaskTaskRunner on
flows.dask_address, or a local cluster of flows.max_workers workers when it is empty).
Results: <sweep dir>/results.parquet (grid values + every metric, timings included) and
results.md (the metrics matching flows.sweep.report).
"""
from __future__ import annotations

import fnmatch
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from components.atomic import atomic_path, write_parquet
from components.config import out_path, params_hash
from components.errors import ConfigError
from flows.flow_params import apply_overrides, flow_run_name
from flows.step_io import ROOT
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
        values = yaml.safe_load(raw)
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


@task(name="sweep-point", cache_policy=NO_CACHE)
def point_task(point_params: dict, start: str, stop: str, api_url: str, group: str) -> dict:
    """Run one point's pipeline in a fresh process; returns its metrics."""
    point_dir = Path(point_params["out_dir"])
    params_file = point_dir / "params.json"
    with atomic_path(params_file) as tmp:
        tmp.write_text(json.dumps(point_params, indent=2, sort_keys=True, default=str))
    env = {**os.environ, "PREFECT_API_URL": api_url, "WANDB_RUN_GROUP": group,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
    cmd = [sys.executable, "-m", "flows.pipeline_flow", "--params-json", str(params_file), "--start", start, "--stop", stop]
    log = point_dir / "point.log"
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"sweep point {point_dir.name} failed (exit {rc}); log {log}:\n{tail}")
    return collect_metrics(point_dir)


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
    axes = parse_grid(grid)
    points = grid_points(axes)
    keys = [k for k, _ in axes]
    sweep_cfg = params.get("flows", {}).get("sweep", {}) or {}
    sweep_id = params_hash({**params, "grid": grid})
    root = out_path(params, "sweeps", sweep_id)
    shared = not any(k.split(".")[0] in UPSTREAM for k in keys)
    start = sweep_cfg.get("start", "train_head") if shared else "prepare"
    stop = sweep_cfg.get("stop", "evaluate")
    if shared and not all(out_path(params, part).exists() for part in SHARED):
        run_steps(params, ["prepare", "embed"])
    api_url = _api_url()
    futures = []
    for point in points:
        point_params = apply_overrides(params, [f"{k}={json.dumps(v)}" for k, v in point.items()])
        point_dir = (root / point_name(point)).resolve()
        point_dir.mkdir(parents=True, exist_ok=True)
        point_params["out_dir"] = str(point_dir)
        if shared:
            for part in SHARED:
                link = point_dir / part
                if not link.exists():
                    os.symlink(out_path(params, part).resolve(), link)
        futures.append(point_task.with_options(task_run_name=f"point-{point_name(point)}").submit(
            point_params, start, stop, api_url, f"sweep-{sweep_id}"))
    rows = [{"point": point_name(p), **p, **f.result()} for p, f in zip(points, futures)]
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
    return sweep_points_flow.with_options(task_runner=task_runner(params))(params=params, grid=list(opt_grid))

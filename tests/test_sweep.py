"""Sweeps: a grid of points run in parallel (one process each), gathered into one table."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from test_flows import build_trained

from components.runtime.config import params_hash
from components.runtime.errors import ConfigError
from flows.flow_params import apply_overrides
from flows.sweep_flow import grid_points, parse_grid, point_name, task_runner

GRID = ["tokenizer.sarq.tau=[3,6]", "seed=[0,1]"]
# tokenizer-only points with few epochs: the retriever would not fit the test budget
QUICK = ["flows.sweep.stop=assign_ids", "tokenizer.epochs_head=2", "tokenizer.epochs_tail=1"]
TIMING = ("seconds", "wall_s", "per_second")


@pytest.fixture(scope="module")
def sweep_params(tmp_path_factory, smoke_embedded, prefect_server) -> dict:
    trained = build_trained(tmp_path_factory.getbasetemp() / "flows_trained", smoke_embedded)
    return apply_overrides(trained["params"], QUICK)


@pytest.mark.slow
def test_sweep_twice_gives_identical_metrics(sweep_params):
    from flows.sweep_flow import sweep_flow

    first = sweep_flow(params=sweep_params, opt_grid=GRID)
    table1 = pd.read_parquet(first["results"])
    second = sweep_flow(params=sweep_params, opt_grid=GRID)
    table2 = pd.read_parquet(second["results"])
    assert first["dir"] == second["dir"] and len(table1) == 4
    assert table1[["tokenizer.sarq.tau", "seed"]].values.tolist() == [[3, 0], [3, 1], [6, 0], [6, 1]]
    metrics = [c for c in table1.columns if not any(t in c for t in TIMING)]
    assert "sid_stats.n_sids" in metrics
    pd.testing.assert_frame_equal(table1[metrics], table2[metrics])
    # the points really differ: a smaller tau stops earlier, so SIDs are shorter
    by_tau = table1.groupby("tokenizer.sarq.tau")["sid_stats.length.all.mean"].mean()
    assert by_tau[3] < by_tau[6]
    point = Path(first["dir"]) / table1["point"].iloc[0]
    assert (point / "prepared").is_symlink() and (point / "sids" / "sid_table.parquet").exists()
    assert "sid_stats.unique_share" in (Path(first["dir"]) / "results.md").read_text()
    # the point processes reported their pipeline runs to this (the sweep's) Prefect server
    name = f"pipeline-{params_hash(json.loads((point / 'params.json').read_text()))}"
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    assert len(runs) == 2 and all(r.state.is_completed() for r in runs)


def test_grid_parsing_and_points():
    axes = parse_grid(["a.b=[1,2]", "c=x"])
    assert axes == [("a.b", [1, 2]), ("c", ["x"])]
    points = grid_points(axes)
    assert points == [{"a.b": 1, "c": "x"}, {"a.b": 2, "c": "x"}]
    assert point_name(points[0]) == "a.b=1,c=x"
    with pytest.raises(ConfigError):
        parse_grid(["nonsense"])
    with pytest.raises(ConfigError):
        parse_grid([])


def test_task_runner_from_params():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    assert isinstance(task_runner({"flows": {"task_runner": "threads", "max_workers": 3}}), ThreadPoolTaskRunner)
    runner = task_runner({"flows": {"task_runner": "dask", "dask_address": "tcp://127.0.0.1:8786"}})
    assert isinstance(runner, DaskTaskRunner) and runner.address == "tcp://127.0.0.1:8786"
    with pytest.raises(ConfigError):
        task_runner({"flows": {"task_runner": "ray"}})

"""Sweeps on DVC: a grid's points are the variants of a scratch comparison (experiments/scratch/), so a
repeated point is the same stage (up to date, not retrained) and a new grid value trains only its points."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, data_root

from components.evaluation.evaluate import headline
from components.runtime.config import load_params
from components.runtime.errors import ConfigError
from flows import compare_dvc
from flows.sweep_flow import grid_points, parse_grid, plan_sweep, point_name, sweep_variants, task_runner

COMMITTED = ("experiments/compare.yaml", "experiments/sets/dvc.yaml", "experiments/dvc.lock")   # the committed plan
SMOKE = ["profile=smoke", "out_dir=outputs-t", "data.max_users=150", "tokenizer.epochs_head=2",
         "tokenizer.epochs_tail=1", "retriever.epochs=1", "flows.max_workers=1"]


def _project(root: Path, data: bool = False) -> Path:
    """The files a sweep's stages name (code, params, experiments/dvc.yaml), in a git + DVC repo."""
    if data:
        for name in ("components", "flows"):
            shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(data_root(), root / "data", ignore=shutil.ignore_patterns("*.md"))
    for name in ("params.yaml", ".dvc/config", "experiments/dvc.yaml", *(COMMITTED if data else ())):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    if data:
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def test_grid_points_are_the_variants_of_a_scratch_comparison(tmp_path, monkeypatch):
    monkeypatch.chdir(_project(tmp_path))
    params = load_params("params.yaml", SMOKE)
    sid, set_params, plan = plan_sweep(params, ["tokenizer.method=[rqkmeans,rqvae]", "seed=[0,1]"])
    assert sid == "outputs_t__sweep"
    assert [v["name"] for v in set_params["eval"]["variants"]] == ["tokenizer.method=rqkmeans",
                                                                   "tokenizer.method=rqvae"]
    assert set_params["eval"]["seeds"] == [0, 1] and set_params["eval"]["baselines"] == []
    runs = [r for r, item in plan["runs"].items() if item["set"] == sid]
    assert runs == [f"{sid}-tokenizer_method_{m}-s{s}" for m in ("rqkmeans", "rqvae") for s in (0, 1)]
    assert plan["runs"][runs[0]]["dir"] == "outputs-t/sweep/points/tokenizer_method_rqkmeans/seed0"
    keys = plan["variant_keys"][f"{sid}-tokenizer_method_rqvae"]
    assert keys["tokenizer"]["method"] == "rqvae" and keys["tokenizer"]["epochs_head"] == 2   # -s kept
    # only scratch files: the committed plan, its sets file and lock are never written
    assert sorted(p.name for p in Path("experiments").iterdir()) == ["dvc.yaml", "scratch"]


def test_a_repeated_point_is_the_same_stage_with_the_same_params(tmp_path, monkeypatch):
    monkeypatch.chdir(_project(tmp_path))
    params = load_params("params.yaml", SMOKE)
    sid, _, plan = plan_sweep(params, ["tokenizer.method=[rqkmeans,rqvae]", "seed=[0,1]"])
    # in a smaller grid: the same run key, the same params (so DVC finds it up to date)
    _, _, again = plan_sweep(params, ["tokenizer.method=[rqkmeans]", "seed=[0]"])
    assert list(again["runs"]) == [f"{sid}-tokenizer_method_rqkmeans-s0"]
    assert again["variant_keys"] == {k: v for k, v in plan["variant_keys"].items() if "rqkmeans" in k}
    # and a stage reads the set back from params.yaml + the recorded overrides, as planned
    assert [v["name"] for v in compare_dvc.load_set(sid)[1]] == ["tokenizer.method=rqkmeans"]


def test_a_grid_over_shared_inputs_or_colliding_names_stops(tmp_path, monkeypatch):
    monkeypatch.chdir(_project(tmp_path))
    params = load_params("params.yaml", SMOKE)
    with pytest.raises(ConfigError, match="'sweep --grid embed.model'.*-s out_dir="):
        plan_sweep(params, ["embed.model=[a,b]"])
    with pytest.raises(ConfigError, match="both named 'x=a_b'"):
        sweep_variants(grid_points(parse_grid(["x=[a b,a_b]"])))
    with pytest.raises(ConfigError, match="same run folder"):
        sweep_variants(grid_points(parse_grid(["x=[a-b,a.b]"])))
    assert not Path("experiments/scratch").exists()


def test_grid_parsing_and_points():
    axes = parse_grid(["a.b=[1,2]", "c=x"])
    assert axes == [("a.b", [1, 2]), ("c", ["x"])]
    points = grid_points(axes)
    assert points == [{"a.b": 1, "c": "x"}, {"a.b": 2, "c": "x"}]
    assert point_name(points[0]) == "a.b=1,c=x"
    variants, seeds = sweep_variants(grid_points(parse_grid(["a.b=[1]", "seed=[3,4]"])))
    assert variants == [{"name": "a.b=1", "params": {"a": {"b": 1}}}] and seeds == [3, 4]
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


def _expected_row(run_dir: Path, k: int) -> dict[str, float]:
    """What the table must say for a point, read straight from the files its stages wrote."""
    sid_stats = json.loads((run_dir / "metrics" / "sid_stats.json").read_text())
    train = json.loads((run_dir / "metrics" / "retriever_train.json").read_text())
    run = json.loads((run_dir / "eval" / "compare_run.json").read_text())
    scores = headline({"constrained": run["constrained"]}, k)["constrained"]
    return {"sid_stats.n_sids": sid_stats["n_sids"], "sid_stats.unique_share": sid_stats["unique_share"],
            "retriever_train.best_val_recall@10": train["best_val_recall@10"],
            f"eval.constrained.recall@{k}": scores[f"recall@{k}"]}


@pytest.mark.slow
def test_a_repeated_sweep_retrains_nothing_and_a_new_point_trains_alone(tmp_path, monkeypatch, prefect_server,
                                                                        smoke_embed_cache):
    """The real thing on the smoke slice: one point, then the grid grown by a seed (only the new point's
    stages run), then the same grid again (nothing runs, the models keep their mtime); the table's values
    are the points' metrics files. (The embed stage reads the smoke catalog's cached vectors.)"""
    from flows.sweep_flow import sweep_flow

    root = _project(tmp_path / "project", data=True)
    shutil.copytree(smoke_embed_cache, root / "outputs-t" / "embed_cache")
    monkeypatch.chdir(root)
    monkeypatch.setenv("PYTHONPATH", str(root))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    before = {name: (root / name).read_bytes() for name in COMMITTED}
    params = load_params("params.yaml", SMOKE)
    grid = ["tokenizer.method=[rqkmeans]"]
    first = sweep_flow(params=params, opt_grid=[*grid, "seed=[0]"])
    assert first["stages_run"] == 5                 # prepare, embed, train, evaluate, aggregate
    runs = root / "outputs-t/sweep/points/tokenizer_method_rqkmeans"
    model = next((runs / "seed0" / "retriever").iterdir())
    mtime = model.stat().st_mtime_ns
    time.sleep(0.01)
    grown = sweep_flow(params=params, opt_grid=[*grid, "seed=[0,1]"])
    assert grown["stages_run"] == 3                 # the new seed's train and evaluate, the aggregate
    again = sweep_flow(params=params, opt_grid=[*grid, "seed=[0,1]"])
    assert again["stages_run"] == 0 and model.stat().st_mtime_ns == mtime
    assert {name: (root / name).read_bytes() for name in COMMITTED} == before
    table = pd.read_parquet(again["results"])
    assert table[["point", "seed"]].values.tolist() == [["tokenizer.method=rqkmeans,seed=0", 0],
                                                      ["tokenizer.method=rqkmeans,seed=1", 1]]
    lines = [line.strip("|").split(" | ") for line in Path(again["markdown"]).read_text().splitlines()
             if line.startswith("| ")]
    header, cells = [c.strip() for c in lines[0]], lines[1:]
    for seed, row, shown in zip((0, 1), table.to_dict("records"), cells):
        want = _expected_row(runs / f"seed{seed}", int(params["eval"]["headline_k"]))
        assert {name: row[name] for name in want} == pytest.approx(want)
        printed = dict(zip(header, (c.strip() for c in shown)))
        assert printed["point"] == row["point"] and printed["seed"] == str(seed)
        assert {name: float(printed[name]) for name in want} == pytest.approx(want, abs=5e-5)
    assert yaml.safe_load((root / "experiments/scratch/compare.yaml").read_text())["sets"]["outputs_t__sweep"]

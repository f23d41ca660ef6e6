"""Prefect flows on the smoke profile, against a real temporary Prefect server.

The slow tests read conftest's session fixture `trained`: the one trained smoke pipeline (the smoke
catalog minus 5% of its cold items, trained by pipeline_flow from train_head to evaluate with a small
retriever; tests/helpers.py build_trained) that the retrain, candidates and probe tests reuse.
Outside DVC's outputs/ flows keep no cache: every call runs its steps.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from components.runtime.config import params_hash
from components.runtime.errors import DataError
from flows.flow_params import apply_overrides


def _artifact_tables(key: str, params: dict) -> list[dict[str, float]]:
    """Every table artifact with this key published for these params (their hash is in the description),
    as {key: value}; other tests of the session publish the same keys for other params."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    tables = []
    for artifact in found:
        if f"(params {params_hash(params)})" in (artifact.description or ""):
            rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
            tables.append({r["key"]: float(r["value"]) for r in rows if _is_number(r["value"])})
    assert tables, key
    return tables


def _is_number(value: object) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


@pytest.mark.slow
def test_pipeline_outputs_hold_what_the_steps_compute(trained):
    """pipeline_flow's outputs: one well-formed SID per item of the catalog it trained on, SID stats that are
    the statistics of that table, headline metrics (every method, every group, within their ranges) that are
    the full results' means, a report naming this run's params, and artifacts holding the files' numbers."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from components.tokenizers.sid_stats import sid_statistics
    from components.tokenizers.sid_table import read_sid_table
    from flows.tracking import flatten, numeric

    params = trained["params"]
    base = Path(params["out_dir"])
    items = pd.read_parquet(base / "prepared" / "items.parquet")
    queries = pd.read_parquet(base / "prepared" / "queries.parquet")
    table = read_sid_table(base / "sids" / "sid_table.parquet")
    meta = json.loads((base / "sids" / "meta.json").read_text())
    held = pd.read_json(trained["new_items"], lines=True, dtype={"item_id": str})
    assert table["item_id"].tolist() == items["item_id"].tolist() and not set(held["item_id"]) & set(items["item_id"])
    sizes = meta["codebook_sizes"]
    assert (table["length"] == table["codes"].map(len)).all() and table["length"].between(1, len(sizes)).all()
    assert all(0 <= c < sizes[i] for codes in table["codes"] for i, c in enumerate(codes))
    assert set(table["version"]) == {meta["version"]}

    stats = json.loads((base / "metrics" / "sid_stats.json").read_text())
    expected = json.loads(json.dumps(sid_statistics(table, items, meta)))    # all but the encoder's errors
    assert {k: stats[k] for k in expected} == expected and "recon_err" in stats
    assert 1 <= stats["n_sids"] <= len(items) and 0 <= stats["unique_share"] <= 1

    headline = json.loads((base / "metrics" / "eval.json").read_text())
    results = json.loads((base / "eval" / "results.json").read_text())
    k = int(params["eval"]["headline_k"])
    assert len(headline) == len(results["methods"]) >= 2 and any("popular" in m.lower() for m in headline)
    for name, method in results["methods"].items():
        row = headline[name.replace(" ", "_").replace("(", "").replace(")", "")]
        for key in (f"recall@{k}", f"ndcg@{k}", f"mrr@{k}"):
            assert {key, f"{key}_head", f"{key}_tail", f"{key}_cold"} <= set(row), (name, key)
            assert 0 <= row[key] <= 1 and row[key] == round(method["overall"]["metrics"][key]["mean"], 5)
    n_test = int((queries["split"] == "test").sum())
    assert next(iter(results["methods"].values()))["overall"]["n_queries"] == n_test

    report = (base / "report" / "report.md").read_text()
    assert params_hash(params) in report and params["tokenizer"]["method"] in report and f"overall {n_test}" in report

    for published in _artifact_tables("evaluate-eval", params):
        assert published == pytest.approx(flatten(headline))
    with get_client(sync_client=True) as client:
        markdown = [a.data for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["evaluate-metrics"])))]
    name, value = next(iter(numeric(flatten(headline)).items()))
    assert any(f"(params {params_hash(params)})" in text and f"| {name} | {value:.4f} |" in text
               and str(base / "report" / "report.md") in text for text in markdown)


@pytest.mark.slow
def test_rerun_outside_dvc_runs_the_steps_again(trained, monkeypatch):
    """Outside DVC's outputs/ a flow keeps no cache of its own: a rerun calls its steps again
    (tests/test_flow_dvc.py: on outputs/, DVC decides), and they give the same SIDs."""
    import flows.tasks
    from flows.pipeline_flow import pipeline_flow

    calls: list[str] = []
    real = flows.tasks.get_step

    def counting(name: str):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(flows.tasks, "get_step", counting)
    params = trained["params"]
    before = pd.read_parquet(Path(params["out_dir"]) / "sids" / "sid_table.parquet")
    shutil.rmtree(Path(params["out_dir"]) / "sids")
    pipeline_flow(params=params, start="assign_ids", stop="assign_ids")
    pipeline_flow(params=params, start="assign_ids", stop="assign_ids")
    assert calls == ["assign_ids", "assign_ids"]
    after = pd.read_parquet(Path(params["out_dir"]) / "sids" / "sid_table.parquet")
    pd.testing.assert_frame_equal(before, after)
    assert not list(Path(params["out_dir"]).rglob(".prefect-cache"))


def test_bad_input_fails_fast_and_io_errors_retry(tmp_path, prefect_server, monkeypatch):
    """DataError is not retried; a transient OSError is, up to flows.retries times."""
    from prefect import flow

    import flows.tasks

    attempts: list[str] = []

    def flaky(params: dict) -> dict:
        attempts.append(params["kind"])
        if params["kind"] == "data" or len(attempts) < 3:
            raise DataError("x.parquet", "bad") if params["kind"] == "data" else OSError("disk hiccup")
        return {"ok": 1}

    monkeypatch.setattr(flows.tasks, "get_step", lambda name: flaky)

    @flow
    def one_step(params: dict) -> dict:
        return flows.tasks.run_step("prepare", params)

    base = {"out_dir": str(tmp_path), "data": {"root": str(tmp_path)}, "flows": {"retries": 2, "retry_delay_s": 0}}
    with pytest.raises(DataError):
        one_step({**base, "kind": "data"})
    assert attempts == ["data"]
    attempts.clear()
    assert one_step({**base, "kind": "io"}) == {"ok": 1}
    assert attempts == ["io", "io", "io"]


@pytest.mark.slow
def test_flow_run_names_carry_params_hash(trained):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    name = f"pipeline-{params_hash(trained['params'])}"
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    assert runs and all(r.state.is_completed() for r in runs)


@pytest.mark.slow
def test_sid_stats_artifact_matches_file(trained):
    """The table artifacts after assign_ids hold the numbers of metrics/sid_stats.json."""
    from flows.tracking import flatten, numeric

    stats = json.loads((Path(trained["params"]["out_dir"]) / "metrics" / "sid_stats.json").read_text())
    expected = numeric(flatten(stats))
    for published in _artifact_tables("assign-ids-sid-stats", trained["params"]):
        assert {k: v for k, v in published.items() if k in expected} == pytest.approx(expected)
        assert published["n_sids"] == stats["n_sids"]


def test_serve_registers_event_trigger_and_schedule(prefect_server, smoke_params):
    """The retrain deployment reacts to the new-items event (file from its payload) and to the cron."""
    from prefect.client.orchestration import get_client

    from components.runtime.errors import ConfigError
    from flows.serve import build_deployment

    params = apply_overrides(smoke_params, ["flows.schedule.cron=0 3 * * *", "flows.schedule.new_items=/in/new.jsonl"])
    deployment_id = build_deployment(params, "params.yaml", ["profile=smoke"]).apply()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
        automations = [a for a in client.read_automations() if a.name == "retrain-on-sa2crq.new-items"]
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.parameters == {"new_items": "/in/new.jsonl", "params_file": "params.yaml", "overrides": ["profile=smoke"]}
    assert automations and automations[0].trigger.expect == {"sa2crq.new-items"}
    assert automations[0].actions[0].parameters == {"new_items": "{{ event.payload.path }}"}
    with pytest.raises(ConfigError):
        build_deployment(apply_overrides(smoke_params, ["flows.schedule.cron=0 3 * * *"]))

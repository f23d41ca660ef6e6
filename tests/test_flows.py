"""Prefect flows on the smoke profile, against a real temporary Prefect server.

`trained` builds the one trained smoke pipeline that every flow test reuses: the smoke
catalog minus 5% of its cold items (kept aside as the retrain test's "new items"), trained by
pipeline_flow from train_head to evaluate with a small retriever. Other test files build it
through the same function, which trains once per session (a marker file says it finished):
outside DVC's outputs/ flows keep no cache, every call runs its steps.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.runtime.config import params_hash
from components.runtime.errors import DataError
from flows.flow_params import apply_overrides

HOLDOUT_FRAC = 0.05
# a tokenizer with enough distinct SIDs (about 2.7 items per SID) to retrieve single items, and a
# small retriever and evaluation, so the trained pipeline fits the test budget on 2 cores
FAST = ["tokenizer.codebook_sizes=[16,32,32]", "tokenizer.extension_sizes=[8,8,8]", "tokenizer.epochs_head=10",
        "tokenizer.epochs_tail=6",
        "retriever.d_model=64", "retriever.n_heads=2", "retriever.n_layers=1", "retriever.ff_dim=128",
        "retriever.epochs=2", "retriever.lr=0.003", "retriever.val_max_queries=50",
        "eval.baselines=[popular]", "eval.bootstrap=20", "eval.ks=[1,10]", "eval.deep_ks=[50]"]


def hold_out_items(src: Path, dst: Path, frac: float, seed: int = 0) -> pd.DataFrame:
    """Copy prepared/ + embeddings/ from src to dst without a seeded `frac` of the cold items
    (and the queries that mention them); returns the held-out items (item_id, text)."""
    items = pd.read_parquet(src / "prepared" / "items.parquet")
    queries = pd.read_parquet(src / "prepared" / "queries.parquet")
    emb = np.load(src / "embeddings" / "items.npy")
    assert (queries["emb_row"] < 0).all(), "the smoke dataset has history queries only"
    cold = np.flatnonzero(items["group"].to_numpy() == "cold")
    n = max(2, int(round(frac * len(items))))
    held = np.sort(np.random.default_rng(seed).choice(cold, min(n, len(cold)), replace=False))
    keep = np.setdiff1d(np.arange(len(items)), held)
    gone = set(items["item_id"].iloc[held])
    mentions = queries["history"].map(lambda h: bool(gone & set(h))) | queries["targets"].map(lambda t: bool(gone & set(t)))
    (dst / "prepared").mkdir(parents=True)
    (dst / "embeddings").mkdir(parents=True)
    items.iloc[keep].reset_index(drop=True).to_parquet(dst / "prepared" / "items.parquet", index=False)
    queries[~mentions].reset_index(drop=True).to_parquet(dst / "prepared" / "queries.parquet", index=False)
    np.save(dst / "embeddings" / "items.npy", emb[keep])
    shutil.copy2(src / "embeddings" / "queries.npy", dst / "embeddings" / "queries.npy")
    return items.iloc[held][["item_id", "text"]].reset_index(drop=True)


def build_trained(root: Path, smoke: dict) -> dict:
    """The trained smoke pipeline in root/base (trained by the first call of the session)."""
    from flows.pipeline_flow import pipeline_flow

    base = root / "base"
    new_items = root / "new_items.jsonl"
    done = root / "trained.done"
    if not base.exists():
        held = hold_out_items(Path(smoke["out_dir"]), base, HOLDOUT_FRAC)
        held.to_json(new_items, orient="records", lines=True)
    params = apply_overrides({**smoke, "out_dir": str(base)}, FAST)
    if not done.exists():
        pipeline_flow(params=params, start="train_head", stop="evaluate")
        done.write_text(params_hash(params))
    return {"params": params, "new_items": new_items}


@pytest.fixture(scope="session")
def trained(tmp_path_factory, smoke_embedded, prefect_server) -> dict:
    return build_trained(tmp_path_factory.getbasetemp() / "flows_trained", smoke_embedded)


@pytest.mark.slow
def test_pipeline_outputs_and_artifacts(trained):
    """pipeline_flow ran every training / evaluation flow and published SID stats and metrics."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    base = Path(trained["params"]["out_dir"])
    for rel in ("tokenizer/head.pt", "tokenizer/tail.pt", "sids/sid_table.parquet", "retriever/model.pt",
                "metrics/eval.json", "metrics/sid_stats.json", "report/report.md"):
        assert (base / rel).exists(), rel
    items = pd.read_parquet(base / "prepared" / "items.parquet")
    table = pd.read_parquet(base / "sids" / "sid_table.parquet")
    assert table["item_id"].tolist() == items["item_id"].tolist()
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["assign-ids-sid-stats", "evaluate-eval", "evaluate-metrics"])))}
    assert keys == {"assign-ids-sid-stats", "evaluate-eval", "evaluate-metrics"}


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
    """The table artifact after assign_ids holds the numbers of metrics/sid_stats.json."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    stats = json.loads((Path(trained["params"]["out_dir"]) / "metrics" / "sid_stats.json").read_text())
    with get_client(sync_client=True) as client:
        latest = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["assign-ids-sid-stats"])))
    rows = json.loads(latest[-1].data) if isinstance(latest[-1].data, str) else latest[-1].data
    table = {r["key"]: r["value"] for r in rows}
    assert float(table["n_sids"]) == stats["n_sids"]
    assert float(table["unique_share"]) == pytest.approx(stats["unique_share"])


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

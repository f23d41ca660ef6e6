"""Prefect tasks around the step functions: retries, artifacts, W&B; no cache of their own.

A task runs one step where it belongs (flows/step_io.py): on the pipeline's out_dir (`outputs/`
of the DVC project) as `dvc repro <step>`, so DVC and dvc.lock decide what is up to date and a
rerun after a crash runs only what DVC finds stale; elsewhere by calling the same
`run_<step>(params)` as the DVC stage and the CLI (components.pipeline.stages.get_step), every time.
- Retries: IO-ish steps (prepare, embed) retry `flows.retries` times on transient errors;
  bad input (DataError, ConfigError, missing files; a DVC stage that exits 2) fails at once.
- Run names carry the params hash; each step publishes its summary and metrics files as
  Prefect table artifacts (SID stats after assign_ids, metrics after evaluate).
"""
from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from prefect import Task, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from components.pipeline.stages import STEPS, get_step
from components.runtime.config import params_hash
from components.runtime.errors import Sa2crqError
from components.runtime.locks import lock_out_dir
from flows.step_io import check_stage_params, dvc_project, dvc_repro, metric_files
from flows.tracking import flatten, log_flow

IO_STEPS = ("prepare", "embed")
FAIL_FAST = (Sa2crqError, FileNotFoundError, KeyError, TypeError)


def is_transient(task: Task, task_run: Any, state: Any) -> bool:
    """Retry condition: never retry bad input or bad config, retry anything else (IO, timeouts)."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return not isinstance(exc, FAIL_FAST)


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    text = "-".join(parts).lower()
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def table_rows(data: dict) -> list[dict[str, str]]:
    """A nested dict as key / value rows (values as text, so any JSON value fits the table)."""
    return [{"key": k, "value": v if isinstance(v, (int, float, str)) else json.dumps(v, default=str)}
            for k, v in flatten(data).items()]


def publish_artifacts(step: str, params: dict, summary: dict) -> None:
    """Table artifacts: the step's summary and each of its metrics files (SID stats, eval)."""
    h = params_hash(params)
    create_table_artifact(table=table_rows(summary or {"status": "done"}), key=artifact_key(step, "summary"),
                          description=f"`{step}` summary (params {h}, out_dir {params.get('out_dir')})")
    for path in metric_files(params, step):
        if path.exists():
            create_table_artifact(table=table_rows(json.loads(path.read_text())), key=artifact_key(step, path.stem),
                                  description=f"`{path.name}` after `{step}` (params {h})")


def _make_task(step: str) -> Task:
    def run(params: dict) -> dict:
        root = dvc_project(params)
        summary = {"dvc_ran": dvc_repro(root, step)} if root else get_step(step)(params) or {}
        publish_artifacts(step, params, summary)
        return summary

    run.__name__ = f"run_{step}"
    run.__doc__ = f"Run step `{step}` (through DVC on its out_dir, else directly) and publish its artifacts."
    return task(run, name=step, retries=0, retry_condition_fn=is_transient, cache_policy=NO_CACHE)


STEP_TASKS: dict[str, Task] = {step: _make_task(step) for step in STEPS}


def step_task(step: str, params: dict) -> Task:
    """The task for a step, configured for these params: run name and retries."""
    flows_cfg = params.get("flows", {})
    return STEP_TASKS[step].with_options(
        task_run_name=f"{step}-{params_hash(params)}",
        retries=int(flows_cfg.get("retries", 2)) if step in IO_STEPS else 0,
        retry_delay_seconds=float(flows_cfg.get("retry_delay_s", 5)),
    )


def run_step(step: str, params: dict) -> dict:
    """Run one step as a Prefect task inside the current flow and return its summary."""
    return step_task(step, params)(params)


def run_steps(params: dict, steps: list[str]) -> dict[str, dict]:
    """Run steps in order as tasks; on DVC's out_dir, first check the params are the stages' own."""
    root = dvc_project(params)
    if root is not None:
        check_stage_params(params, root, steps)
    return {step: run_step(step, params) for step in steps}


def flow_lock(params: dict) -> AbstractContextManager:
    """The out_dir lock a flow holds across its steps. On DVC's out_dir the stages are other
    processes that take it themselves (and DVC's repository lock keeps two repros apart)."""
    return nullcontext() if dvc_project(params) else lock_out_dir(params)


def run_and_log(params: dict, steps: list[str], flow_name: str) -> dict[str, dict]:
    """A flow's body: run its steps (holding the out_dir lock across them), then log them to one W&B run."""
    with flow_lock(params):
        summaries = run_steps(params, steps)
    log_flow(params, flow_name, summaries, {s: metric_files(params, s) for s in summaries})
    return summaries

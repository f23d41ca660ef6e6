"""Prefect tasks around the step functions: retries, caching that resumes runs, artifacts.

A task calls the same `run_<step>(params)` as DVC and the CLI (components.stages.get_step).
- Retries: IO-ish steps (prepare, embed) retry `flows.retries` times on transient errors;
  bad input (DataError, ConfigError, missing files) fails at once.
- Cache: the key is the step, the hash of its params sections (dvc.yaml), the content of its
  input files and its code (flows/step_io.py). Results live in `<out_dir>/.prefect-cache`, so
  rerunning a flow after a crash skips the steps that finished; a step whose outputs are gone
  runs again. `flows.cache: false` forces every step to run.
- Run names carry the params hash; each step publishes its summary and metrics files as
  Prefect table artifacts (SID stats after assign_ids, metrics after evaluate).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from prefect import Task, task
from prefect.artifacts import create_table_artifact
from prefect.filesystems import LocalFileSystem

from components.config import out_path, params_hash
from components.errors import Sa2crqError
from components.locks import lock_out_dir
from components.stages import STEPS, get_step
from flows.step_io import cache_key, outputs_present, step_io
from flows.tracking import flatten, log_flow

IO_STEPS = ("prepare", "embed")
FAIL_FAST = (Sa2crqError, FileNotFoundError, KeyError, TypeError)
CACHE_DIR = ".prefect-cache"


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


def metric_files(params: dict, step: str) -> list[Path]:
    """The JSON metrics files a step writes (dvc.yaml outs ending in .json)."""
    return [out_path(params, o) for o in step_io(step).outs if o.endswith(".json")]


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
        summary = get_step(step)(params) or {}
        publish_artifacts(step, params, summary)
        return summary

    run.__name__ = f"run_{step}"
    run.__doc__ = f"Run step `{step}` (components.stages) and publish its artifacts."
    key_fn: Callable[[Any, dict], str] = lambda ctx, inputs: cache_key(inputs["params"], step)  # noqa: E731
    return task(
        run,
        name=step,
        retries=0,
        retry_condition_fn=is_transient,
        persist_result=True,
        cache_key_fn=key_fn,
    )


STEP_TASKS: dict[str, Task] = {step: _make_task(step) for step in STEPS}


def cache_storage(params: dict) -> LocalFileSystem:
    """A local result store under out_dir, saved as a block (Prefect requires that for caching)."""
    base = out_path(params, CACHE_DIR).resolve()
    base.mkdir(parents=True, exist_ok=True)
    store = LocalFileSystem(basepath=str(base))
    store.save(f"sa2crq-cache-{hashlib.sha256(str(base).encode()).hexdigest()[:12]}", overwrite=True)
    return store


def step_task(step: str, params: dict, storage: LocalFileSystem | None = None) -> Task:
    """The task for a step, configured for these params: run name, retries, cache, storage."""
    flows_cfg = params.get("flows", {})
    use_cache = bool(flows_cfg.get("cache", True)) and outputs_present(params, step)
    return STEP_TASKS[step].with_options(
        task_run_name=f"{step}-{params_hash(params)}",
        retries=int(flows_cfg.get("retries", 2)) if step in IO_STEPS else 0,
        retry_delay_seconds=float(flows_cfg.get("retry_delay_s", 5)),
        result_storage=storage or cache_storage(params),
        refresh_cache=not use_cache,
    )


def run_step(step: str, params: dict, storage: LocalFileSystem | None = None) -> dict:
    """Run one step as a Prefect task inside the current flow and return its summary."""
    return step_task(step, params, storage)(params)


def run_steps(params: dict, steps: list[str]) -> dict[str, dict]:
    """Run steps in order as tasks (one result store for all); returns their summaries."""
    storage = cache_storage(params)
    return {step: run_step(step, params, storage) for step in steps}


def run_and_log(params: dict, steps: list[str], flow_name: str) -> dict[str, dict]:
    """A flow's body: run its steps (holding the out_dir lock across them), then log them to one W&B run."""
    with lock_out_dir(params):
        summaries = run_steps(params, steps)
    log_flow(params, flow_name, summaries, {s: metric_files(params, s) for s in summaries})
    return summaries

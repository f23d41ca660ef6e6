"""Weights & Biases for every flow: config, metrics and artifacts (SID table, codebooks).

Offline by default (params `wandb.mode`); `WANDB_MODE=disabled` in the environment wins, so
tests never start wandb. A flow logs one run once its steps are done (the retriever and
evaluation steps open and finish runs of their own, so a flow's run is never open across
them); flows called by the pipeline leave their steps to the pipeline's run, so a pipeline
or a sweep point is one flow run in W&B (grouped with the steps' runs by WANDB_RUN_GROUP).
"""
from __future__ import annotations

import contextvars
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from components.runtime.config import params_hash
from components.runtime.paths import out_path, wandb_dir

_NESTED: contextvars.ContextVar[bool] = contextvars.ContextVar("sa2crq_wandb_nested", default=False)

# what each step leaves that is worth keeping as a W&B artifact: (artifact type, paths under out_dir)
STEP_ARTIFACTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "train_head": ("codebooks", ("tokenizer/head.pt",)),
    "train_tail": ("codebooks", ("tokenizer/tail.pt",)),
    "assign_ids": ("sid_table", ("sids",)),
}


def wandb_mode(params: dict) -> str:
    """The mode a run would use: the environment's `disabled` beats params `wandb.mode`."""
    if os.environ.get("WANDB_MODE", "").lower() == "disabled":
        return "disabled"
    return str(params.get("wandb", {}).get("mode", "offline"))


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists of scalars are kept whole."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """Only the numbers of a flat dict (bools excluded): what W&B can chart."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@contextmanager
def nested_flows() -> Iterator[None]:
    """Inside, flows leave W&B logging to the caller (a pipeline logs its subflows' steps once)."""
    token = _NESTED.set(True)
    try:
        yield
    finally:
        _NESTED.reset(token)


@contextmanager
def wandb_run(params: dict, name: str, job_type: str) -> Iterator[Any]:
    """A run for one flow, opened after its steps ran (steps open and finish W&B runs of their
    own); yields None when W&B is disabled or when a calling flow logs instead."""
    mode = wandb_mode(params)
    if _NESTED.get() or mode == "disabled":
        yield None
        return
    import wandb

    run_dir = wandb_dir(params)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=params.get("wandb", {}).get("project", "sa2crq"),
        name=f"{name}-{params_hash(params)}",
        job_type=job_type,
        group=os.environ.get("WANDB_RUN_GROUP") or None,
        config={k: v for k, v in params.items() if not k.startswith("_")},
        mode=mode,
        dir=str(run_dir),
        reinit="create_new",
    )
    try:
        yield run
    finally:
        run.finish()


def log_flow(params: dict, name: str, summaries: dict[str, dict], metric_files: dict[str, list[Path]]) -> None:
    """One W&B run for a flow: each step's summary, metrics files and artifacts."""
    with wandb_run(params, name, name.replace("-", "_")) as run:
        for step, summary in summaries.items():
            log_step(run, params, step, summary, metric_files.get(step, []))


def log_metrics(run: Any, metrics: dict[str, Any], prefix: str = "") -> None:
    """Log the numeric part of a (nested) dict under `prefix/` and keep it in the summary."""
    if run is None:
        return
    flat = numeric(flatten(metrics))
    if flat:
        run.log({f"{prefix}/{k}" if prefix else k: v for k, v in flat.items()})


def log_step(run: Any, params: dict, step: str, summary: dict, metric_files: list[Path]) -> None:
    """After a step: its summary, its metrics files, and its artifacts (SID table, codebooks)."""
    if run is None:
        return
    log_metrics(run, summary or {}, prefix=step)
    for path in metric_files:
        if path.suffix == ".json" and path.exists():
            log_metrics(run, json.loads(path.read_text()), prefix=f"{step}/{path.stem}")
    if step in STEP_ARTIFACTS:
        kind, rel_paths = STEP_ARTIFACTS[step]
        log_artifact(run, f"{step}-{params_hash(params)}", kind, [out_path(params, p) for p in rel_paths])


def log_artifact(run: Any, name: str, kind: str, paths: list[Path]) -> None:
    """Attach files / folders to a W&B artifact (skipping the ones that do not exist)."""
    if run is None:
        return
    import wandb

    artifact = wandb.Artifact(name=name, type=kind)
    for path in paths:
        if path.is_dir():
            artifact.add_dir(str(path), name=path.name)
        elif path.exists():
            artifact.add_file(str(path))
    run.log_artifact(artifact)

"""The pipeline's steps by name: DVC stages, flows and the CLI all resolve them here.

A step runs holding its out_dir's lock (components/runtime/locks.py), so two runs never write one
folder at once; a write that runs out of disk space becomes one clear error (atomic writes
left the step's earlier outputs as they were).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

from components.pipeline.steps import STEPS
from components.runtime.atomic import out_of_space
from components.runtime.errors import Sa2crqError, UnknownNameError
from components.runtime.locks import lock_out_dir
from components.runtime.paths import out_path


def get_step(name: str) -> Callable[[dict], dict]:
    """The function for a step (a clear error for unknown names), wrapped to hold the out_dir
    lock while it runs."""
    if name not in STEPS:
        raise UnknownNameError(f"unknown step {name!r}; steps are: {', '.join(STEPS)}")
    step = STEPS[name]

    @functools.wraps(step)
    def locked(params: dict) -> dict:
        try:
            with lock_out_dir(params):
                return step(params)
        except Exception as exc:
            if out_of_space(exc):
                raise Sa2crqError(f"{out_path(params)}/: no space left on device during step {name}; "
                                  "its earlier outputs were left as they were (free space or set "
                                  "out_dir elsewhere)") from exc
            raise

    return locked

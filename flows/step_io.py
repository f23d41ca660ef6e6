"""Where a flow's steps run: through DVC on the pipeline's out_dir, as plain calls elsewhere.

dvc.yaml's stages read and write `outputs/` of the project that holds it, and dvc.lock records
what they ran with; DVC alone decides there what is up to date. So on that out_dir a flow runs
a step as `dvc repro <step>` (dvc.repo.Repo.reproduce: upstream stages DVC finds stale run
first, and dvc.lock stays true). The stages load params.yaml themselves, so the flow's params
must be what params.yaml gives: an override there is refused (one ConfigError naming the key),
since it would not reach them (a key no stage up to the step reads is the flow's own, e.g.
`flows.*`); `sa2crq run -s key=value` (dvc exp run) is the way to run the
pipeline with one. On any other out_dir (tests, scratch runs, sweep points) the flow calls the
step functions (components.pipeline.stages) directly, with no cache of its own.
"""
from __future__ import annotations

import contextlib
import os
import sys
from functools import cache
from pathlib import Path

from components.runtime.atomic import path_error
from components.runtime.config import load_params
from components.runtime.errors import ConfigError, Sa2crqError
from components.runtime.paths import DVC_FILE, PIPELINE_OUT, ROOT, out_path
from components.runtime.resolved_params import RESOLVED_FILE

STAGE_FAILED = 2                  # exit status of `sa2crq stage` on bad input / params / a busy folder


def require_dvc_out_dir(params: dict) -> None:
    """`sa2crq run` runs dvc.yaml, whose stages read and write outputs/ by name: another
    out_dir would run every stage into it while DVC tracks (and caches) outputs/. Refuse it."""
    out = Path(params.get("out_dir", PIPELINE_OUT))
    if os.path.normpath(out) != PIPELINE_OUT and out.resolve() != (ROOT / PIPELINE_OUT).resolve():
        raise ConfigError("out_dir", f"`sa2crq run` runs dvc.yaml, whose stages write {PIPELINE_OUT}/, not {out}/; "
                                     f"use `sa2crq stage <name> -s out_dir={out}` (or `sa2crq compare -s out_dir={out}`), "
                                     f"or change the {PIPELINE_OUT}/ paths in dvc.yaml")


def dvc_project(params: dict) -> Path | None:
    """The DVC project whose dvc.yaml writes this out_dir (`<project>/outputs`), else None."""
    out = Path(params.get("out_dir", PIPELINE_OUT)).resolve()
    root = out.parent
    if out.name == PIPELINE_OUT and (root / DVC_FILE.name).is_file() and (root / ".dvc").is_dir():
        return root
    return None


def stage_param_keys(root: Path, step: str) -> list[str]:
    """The resolved-params keys `dvc repro <step>` runs on: those dvc.yaml lists for the step and
    for every stage upstream of it (read through DVC's own parser and graph)."""
    import networkx as nx
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        target = repo.stage.collect(f"{root / DVC_FILE.name}:{step}")[0]
        return sorted({key for stage in nx.dfs_postorder_nodes(repo.index.graph, target) for dep in stage.deps
                       if isinstance(dep, ParamsDependency) and Path(dep.fs_path).name == RESOLVED_FILE
                       for key in dep.params})


def _value(params: dict, key: str) -> object:
    for part in key.split("."):
        params = params.get(part) if isinstance(params, dict) else None
    return params


def _difference(key: str, mine: object, theirs: object) -> tuple[str, object, object] | None:
    """The first leaf (key, mine, theirs) where two values differ, or None."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for sub in sorted(set(mine) | set(theirs)):
            found = _difference(f"{key}.{sub}", mine.get(sub), theirs.get(sub))
            if found:
                return found
        return None
    return None if mine == theirs else (key, mine, theirs)


def check_stage_params(params: dict, root: Path, steps: list[str]) -> None:
    """Refuse params the DVC stages would not run with: they load root/params.yaml, not the flow's
    params, so a key they read must have the same value in both (other keys are the flow's own)."""
    stages = load_params(root / "params.yaml")
    for listed in sorted({k for step in steps for k in stage_param_keys(root, step)}):
        found = _difference(listed, _value(params, listed), _value(stages, listed))
        if found:
            key, mine, theirs = found
            raise ConfigError(key, f"is {mine!r} for this flow but {theirs!r} in {root / 'params.yaml'}, which the "
                                   f"DVC stages on {root / PIPELINE_OUT}/ read: set it there, run "
                                   f"`sa2crq run -s {key}=...` (dvc exp run), or give the flow another out_dir")


def dvc_repro(root: Path, step: str) -> list[str]:
    """`dvc repro <step>` in root; the stages DVC ran (none when all were up to date).

    A stage that stops on bad input exits 2 after printing its one line: that becomes a
    Sa2crqError (never retried), as does the OS refusing DVC a path of the stage (an out that
    a file blocks, a read-only or full disk: PathError); any other failure is raised as DVC reports it."""
    from dvc.exceptions import ReproductionError
    from dvc.lock import LockError
    from dvc.repo import Repo

    # the stages run `sa2crq`: the one installed beside this interpreter, even when no venv is active
    run_env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        # DVC resolves targets and stage paths against the working directory, as its CLI run in root does
        with contextlib.chdir(root), Repo(str(root)) as repo:
            ran = repo.reproduce(f"{DVC_FILE.name}:{step}", run_env=run_env)
    except LockError:
        raise Sa2crqError(f"{root}: another DVC process holds the repository lock; rerun when it has finished") from None
    except ReproductionError as exc:
        cause = exc.__cause__
        if cause is not None and str(cause).endswith(f"exited with {STAGE_FAILED}"):
            raise Sa2crqError(f"dvc repro {step}: {cause} (the stage's message is above)") from None
        if isinstance(cause, OSError) and cause.errno is not None:
            raise path_error(root / PIPELINE_OUT, cause, f"run dvc repro {step}") from exc
        raise
    return [stage.name for stage in ran]


@cache
def _stage_metrics(step: str) -> tuple[str, ...]:
    """dvc.yaml's JSON metrics of a stage, relative to outputs/ (read through DVC's own parser)."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        stage = repo.stage.collect(f"{DVC_FILE}:{step}")[0]
        base = ROOT / PIPELINE_OUT
        return tuple(str(Path(o.fs_path).relative_to(base)) for o in stage.outs
                     if o.metric and o.fs_path.endswith(".json"))


def metric_files(params: dict, step: str) -> list[Path]:
    """The JSON metrics files a step writes (its dvc.yaml metrics), under this params' out_dir."""
    return [out_path(params, rel) for rel in _stage_metrics(step)]

"""Flows on a DVC project's outputs/ run their steps through `dvc repro`: DVC decides what is stale.

The project is a temporary git + DVC repo whose prepare and embed stages are small scripts that
log each run (tests/test_dvc_pipeline.py runs the real stages through DVC and a flow); its
resolve_params stage is the real `sa2crq resolve-params`.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from components.runtime.config import load_params
from components.runtime.errors import ConfigError, Sa2crqError

STAGE = """import pathlib, sys
name = sys.argv[1]
log = pathlib.Path("ran.log")
log.write_text((log.read_text() if log.exists() else "") + name + "\\n")
fail = pathlib.Path("exit_" + name)
if fail.exists():
    sys.exit(int(fail.read_text()))
out = pathlib.Path("outputs", name)
out.mkdir(parents=True, exist_ok=True)
(out / "done").write_text(pathlib.Path("outputs/params.resolved.yaml").read_text())
"""
PIPELINE = {"stages": {
    "resolve_params": {"cmd": "sa2crq resolve-params", "params": [{"params.yaml": None}],
                       "outs": ["outputs/params.resolved.yaml"]},
    "prepare": {"cmd": "python stage.py prepare", "params": [{"outputs/params.resolved.yaml": ["dataset", "data"]}],
                "outs": ["outputs/prepare"]},
    "embed": {"cmd": "python stage.py embed", "deps": ["outputs/prepare"],
              "params": [{"outputs/params.resolved.yaml": ["embed.max_chars"]}], "outs": ["outputs/embed"]},
}}


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text(yaml.safe_dump(PIPELINE, sort_keys=False))
    (root / "stage.py").write_text(STAGE)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    from dvc.repo import Repo

    Repo.init(str(root)).close()
    return root


def _params(root: Path, overrides: list[str] | None = None) -> dict:
    return load_params(root / "params.yaml", [f"out_dir={root / 'outputs'}", *(overrides or [])])


def _ran(root: Path) -> list[str]:
    log = root / "ran.log"
    return log.read_text().split() if log.exists() else []


def _run(root: Path, params: dict, overrides: list[str] | None = None) -> dict:
    from flows.pipeline_flow import pipeline_flow

    out = pipeline_flow(params=params, overrides=overrides, start="prepare", stop="embed")
    return {step: out[step]["dvc_ran"] for step in ("prepare", "embed")}


def test_flow_runs_what_dvc_finds_stale(project: Path, prefect_server):
    """First run: every stage; rerun: none; a lost output (a crash) or a changed param: what depends on it."""
    params = _params(project)
    assert _run(project, params) == {"prepare": ["resolve_params", "prepare"], "embed": ["embed"]}
    assert _ran(project) == ["prepare", "embed"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"resolve_params", "prepare", "embed"}

    assert _run(project, params) == {"prepare": [], "embed": []}
    shutil.rmtree(project / "outputs" / "embed")                 # lost in a crash: DVC restores it from its run cache
    assert _run(project, params) == {"prepare": [], "embed": ["embed"]}
    assert (project / "outputs" / "embed" / "done").exists() and _ran(project) == ["prepare", "embed"]

    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("  max_chars: 1000 ", "  max_chars: 900 ", 1))
    assert _run(project, _params(project)) == {"prepare": ["resolve_params"], "embed": ["embed"]}
    assert "max_chars: 900" in (project / "outputs" / "embed" / "done").read_text()
    assert _ran(project) == ["prepare", "embed", "embed"]
    assert not list(project.rglob(".prefect-cache"))


def test_flow_refuses_overrides_the_stages_would_not_see(project: Path, prefect_server):
    """The stages load params.yaml: an override of a key they read stops the flow before any stage runs;
    the flow's own keys (flows.*) are fine."""
    with pytest.raises(ConfigError, match=r"'embed\.max_chars': is 7 for this flow but 1000 in .*sa2crq run -s"):
        _run(project, _params(project), overrides=["embed.max_chars=7"])
    with pytest.raises(ConfigError, match=r"'data\.max_users'"):
        _run(project, _params(project, ["profile=smoke"]))
    assert _ran(project) == []
    assert _run(project, _params(project), overrides=["flows.retries=0"])["embed"] == ["embed"]


@pytest.mark.parametrize("status, attempts, error", [(2, 1, Sa2crqError), (1, 3, Exception)])
def test_a_stage_that_stops_on_bad_input_is_not_retried(project: Path, prefect_server, status, attempts, error):
    """Exit 2 (sa2crq's bad input / params) fails at once; another failure of an IO step is retried."""
    (project / "exit_prepare").write_text(str(status))
    with pytest.raises(error) as info:
        _run(project, _params(project, ["flows.retries=2", "flows.retry_delay_s=0"]))
    assert isinstance(info.value, Sa2crqError) == (status == 2)
    assert _ran(project) == ["prepare"] * attempts

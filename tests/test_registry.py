"""The model registry in a DVC project: promotion keeps dvc.lock on what is live, GTO names prod,
a rollback assigns prod back, and a later `dvc repro` leaves the promoted model alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.lifecycle.registry import ARTIFACT, VERSIONED, registry_for
from components.lifecycle.versions import CHECKS_RECORD, live_version, promote, show_versions

# one stage builds every versioned folder (the real pipeline splits it over six stages), and
# evaluate reads the retriever, as the real evaluate does
BUILD = f"""import json, sys
from pathlib import Path
for name in {list(VERSIONED)}:
    Path("outputs", name).mkdir(parents=True, exist_ok=True)
    Path("outputs", name, "mark.txt").write_text("trained")
Path("outputs/sids/meta.json").write_text(json.dumps({{"version": "v1"}}))
"""
DVC_YAML = f"""stages:
  build:
    cmd: {sys.executable} build.py
    deps: [build.py]
    outs: [{", ".join(f"outputs/{n}" for n in VERSIONED)}]
  evaluate:
    cmd: {sys.executable} -c "import pathlib; pathlib.Path('outputs/eval.txt').write_text(pathlib.Path('outputs/retriever/mark.txt').read_text())"
    deps: [outputs/retriever]
    outs: [outputs/eval.txt]
artifacts:
  {ARTIFACT}:
    path: outputs/retriever
    type: model
"""


def _run(repo: Path, *cmd: str) -> str:
    res = subprocess.run(list(cmd), cwd=repo, capture_output=True, text=True,
                         env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert res.returncode == 0, res.stderr
    return res.stdout


def _dvc(repo: Path, *args: str) -> str:
    return _run(repo, sys.executable, "-m", "dvc", *args)


def _changed_stages(repo: Path) -> set[str]:
    return set(json.loads(_dvc(repo, "status", "--json") or "{}"))


def _marks(root: Path) -> set[str]:
    return {(root / name / "mark.txt").read_text() for name in VERSIONED}


@pytest.fixture
def project(tmp_path) -> Path:
    """A git + DVC project whose pipeline built outputs/ (version v1) and is committed."""
    repo = tmp_path / "project"
    repo.mkdir()
    _run(repo, "git", "init", "-q")
    _run(repo, "git", "config", "user.name", "test")
    _run(repo, "git", "config", "user.email", "test@example.com")
    _dvc(repo, "init", "-q")
    _dvc(repo, "config", "core.analytics", "false")
    (repo / "build.py").write_text(BUILD)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    _dvc(repo, "repro", "-q")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "pipeline")
    cand = repo / "outputs" / "versions" / "v1.r1"
    for name in VERSIONED:
        (cand / name).mkdir(parents=True)
        (cand / name / "mark.txt").write_text("retrained")
    (cand / "sids" / "meta.json").write_text(json.dumps({"version": "v1.r1"}))
    (cand / "retriever" / CHECKS_RECORD).write_text(json.dumps({"candidate": "v1.r1", "passed": True}))
    return repo


def test_promotion_keeps_dvc_lock_on_the_live_model_and_repro_leaves_it(project):
    out = project / "outputs"
    assert registry_for(out, root=project).repo == project     # the project's own git repository
    (project / "unrelated.txt").write_text("staged by the user")
    _run(project, "git", "add", "unrelated.txt")

    assert promote(out, "v1.r1", root=project) == "v1"
    assert live_version(out) == "v1.r1" and _marks(out) == {"retrained"}
    # dvc.lock describes what is live: only evaluate (reading the new retriever) is stale
    assert _changed_stages(project) == {"evaluate"}
    _dvc(project, "repro", "-q")
    assert _marks(out) == {"retrained"} and (out / "eval.txt").read_text() == "retrained"
    assert _changed_stages(project) == set()
    # GTO names the promoted version prod; its commit holds dvc.lock alone (the user's staged file stays staged)
    registry = show_versions(out, root=project)
    assert registry["prod"] == "v1.r1" and [v["version"] for v in registry["versions"]] == ["v1.r1", "v1"]
    assert _run(project, "git", "diff", "--cached", "--name-only").split() == ["unrelated.txt"]
    new_commit = registry["versions"][0]["commit"]
    assert _run(project, "git", "show", "--name-only", "--format=", new_commit).split() == ["dvc.lock"]

    # rollback: prod goes back to v1, dvc.lock follows, repro still keeps the live files
    assert promote(out, "v1", root=project) == "v1.r1"
    assert _marks(out) == {"trained"} and show_versions(out, root=project)["prod"] == "v1"
    assert _changed_stages(project) == {"evaluate"}
    _dvc(project, "repro", "-q")
    assert _marks(out) == {"trained"} and (out / "eval.txt").read_text() == "trained"
    tags = _run(project, "git", "tag").split()
    assert f"{ARTIFACT}@v0.0.2+v1.r1" in tags and f"{ARTIFACT}@v0.0.1+v1" in tags

    # a registered version comes back byte for byte from its commit's dvc.lock and the DVC cache
    _run(project, "git", "checkout", new_commit, "--", "dvc.lock")
    _dvc(project, "checkout", "-q", "--force")
    assert _marks(out) == {"retrained"}


def _tree(root: Path, version: str, mark: str) -> None:
    for name in VERSIONED:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "mark.txt").write_text(mark)
    (root / "sids" / "meta.json").write_text(json.dumps({"version": version}))
    (root / "retriever" / CHECKS_RECORD).write_text(json.dumps({"candidate": version, "passed": True}))


def test_cli_promote_rollback_and_versions_outside_the_project(tmp_path, capsys):
    """An out_dir that is not the project's outputs/ keeps its registry in <out_dir>/registry;
    `sa2crq promote` promotes and rolls back, `sa2crq versions` shows prod, a bad name exits 2."""
    from sa2crq.cli import main

    out = tmp_path / "out"
    _tree(out, "v1", "old")
    _tree(out / "versions" / "v1.r1", "v1.r1", "new")
    args = ["--params", str(Path(__file__).resolve().parents[1] / "params.yaml"), "-s", f"out_dir={out}"]
    assert main(["versions", *args]) == 0
    assert json.loads(capsys.readouterr().out) == {"out_dir": str(out), "live": "v1", "repo": str(out / "registry"),
                                                   "prod": None, "versions": []}
    assert main(["promote", "v1.r1", *args]) == 0
    promoted = json.loads(capsys.readouterr().out)
    assert promoted["live"] == "v1.r1" and promoted["previous"] == "v1" and promoted["registry"]["prod"] == "v1.r1"
    assert _marks(out) == {"new"}
    assert main(["promote", "v1", *args]) == 0                   # rollback: prod back on v1
    capsys.readouterr()
    assert main(["versions", *args]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["live"] == shown["prod"] == "v1" and _marks(out) == {"old"}
    assert [(v["version"], v["stages"]) for v in shown["versions"]] == [("v1.r1", []), ("v1", ["prod"])]
    # the fallback's commits each hold the manifest of the version made live
    manifest = json.loads(_run(out / "registry", "git", "show", f"{ARTIFACT}@{shown['versions'][0]['gto_version']}:"
                                                                 f"{ARTIFACT}.json"))
    assert manifest["version"] == "v1.r1" and set(manifest["files"]) >= {"retriever/mark.txt", "sids/meta.json"}
    assert main(["promote", "v9", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "v9" in err[0] and "Traceback" not in err[0]

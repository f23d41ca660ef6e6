"""Issue 22 part 3: DVC code deps that cannot drift.

dvc.yaml's train_retriever left out fusion.py, fusion_tuning.py, retrieve.py, item_scorer.py and
baselines/classic.py (all read while training), evaluate left out fusion.py, retriever.py and
constrained_decoding.py: edit one and `dvc status` stayed clean while the results were stale.
The code deps now come from the imports (components/runtime/stage_deps.py, `sa2crq deps`); these
tests fail when a stage of dvc.yaml, experiments/dvc.yaml or a comparison set misses a module it
imports, and (slow) show real DVC rerunning the stages an edit of fusion or decoding reaches.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.runtime.config import load_params
from components.runtime.stage_deps import ImportGraph, StageDepsError, pipeline_roots, stage_deps, uncovered
from flows import compare_dvc

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
COMPARE = {f"{path}:{name}": stage for path in (compare_dvc.DVC_FILE, compare_dvc.SETS_FILE)
           for name, stage in yaml.safe_load((ROOT / path).read_text())["stages"].items()}


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph(ROOT)


@pytest.mark.parametrize("stage", list(PIPELINE))
def test_dvc_stage_deps_cover_what_its_step_imports(graph, stage):
    """Every project module the stage's step imports, transitively, is one of its deps (or under one)."""
    needed = graph.code_deps(pipeline_roots(PIPELINE)[stage])
    assert needed, f"{stage}: no code found for it"
    assert uncovered(needed, stage_deps(PIPELINE[stage])) == [], f"dvc.yaml stage {stage}: run `sa2crq deps`"


@pytest.mark.parametrize("stage", list(COMPARE))
def test_compare_stage_deps_cover_what_it_runs(graph, stage):
    """experiments/dvc.yaml's run stages and the committed sets' stages cover what their compare-step imports."""
    needed = graph.code_deps(compare_dvc.CODE_ROOTS[compare_dvc.stage_kind(stage.split(":")[1])])
    assert uncovered(needed, stage_deps(COMPARE[stage])) == [], f"{stage}: run `sa2crq deps`"


def test_planned_set_stages_get_their_code_deps_from_the_imports(graph, monkeypatch):
    """plan_set (what `sa2crq compare` writes for a new set) lists the imports' closure, not a hand-kept list."""
    monkeypatch.chdir(ROOT)
    params = load_params("params.yaml", ["out_dir=outputs-deps-probe"])
    sid, plan = compare_dvc.plan_set(params, "params.yaml", [], [], "sa2crq compare")
    assert set(plan["stages"]) == {f"{kind}_{sid}" for kind in ("prepare", "embed", "aggregate")}
    for name, stage in plan["stages"].items():
        needed = graph.code_deps(compare_dvc.CODE_ROOTS[compare_dvc.stage_kind(name)])
        assert uncovered(needed, stage["deps"]) == [], name


def test_closure_follows_lazy_imports_not_type_checking_nor_other_steps(tmp_path):
    """A toy tree: a lazy import inside a function counts, an `if TYPE_CHECKING:` one does not, the step
    table reached through an import adds no other step, a docstring-only __init__.py is no dep."""
    files = {
        "components/__init__.py": '"""doc"""\n',
        "components/pipeline/__init__.py": "from components.pipeline import helper as _  # noqa\n",
        "components/pipeline/helper.py": "",
        "components/pipeline/steps.py": (
            "def fit(params):\n    from components.fit import run\n    return run(params)\n\n\n"
            "def other(params):\n    from components.other import run\n    return run(params)\n\n\n"
            "STEPS = {f.__name__: f for f in (fit, other)}\n"),
        "components/fit.py": ("from typing import TYPE_CHECKING\nfrom components import schema\n"
                              "if TYPE_CHECKING:\n    from components import typed\n\n\n"
                              "def run(params):\n    from .fusion import fuse\n    return fuse(params)\n"),
        "components/fusion.py": "import numpy\n",
        "components/schema.py": "from components.pipeline.steps import STEPS\n",
        "components/typed.py": "", "components/other.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = ImportGraph(tmp_path)
    assert graph.code_deps(["step:fit"]) == ["components/fit.py", "components/fusion.py", "components/pipeline/__init__.py",
                                             "components/pipeline/helper.py", "components/pipeline/steps.py",
                                             "components/schema.py"]
    assert uncovered(graph.code_deps(["step:fit"]), ["components/pipeline", "components/fit.py"]) == [
        "components/fusion.py", "components/schema.py"]
    with pytest.raises(StageDepsError, match="no step 'missing'"):
        graph.code_deps(["step:missing"])


def _dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _copy_project(dest: Path) -> Path:
    """The project's files as git sees them (tracked and not ignored), in a git repo of their own."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def _stand_ins(root: Path, stages: list[str]) -> None:
    """The stages' data deps, outputs and params as placeholder files: `dvc commit` records them as run."""
    resolved: dict = {}
    for name in stages:
        stage = PIPELINE[name]
        for entry in stage.get("params") or []:
            for key in next(iter(entry.values())) or []:
                node = resolved
                *parents, leaf = key.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node.setdefault(leaf, 0)
        for entry in [*stage["deps"], *stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]:
            path = root / (next(iter(entry)) if isinstance(entry, dict) else entry)
            if not path.exists():
                target = path if path.suffix else path / "part.bin"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(f"stand-in for {name}")
    (root / "outputs" / "params.resolved.yaml").write_text(yaml.safe_dump(resolved))


def _changed(root: Path, stages: list[str]) -> dict[str, set[str]]:
    """`dvc status` of the stages: the code deps it reports modified, by stage."""
    status = json.loads(_dvc(["status", "--json", *stages], root).stdout or "{}")
    return {name: {dep for change in changes if isinstance(change, dict)
                   for dep, what in change.get("changed deps", {}).items() if what == "modified"}
            for name, changes in status.items()}


@pytest.mark.slow
def test_editing_fusion_or_decoding_makes_dvc_rerun_train_retriever_and_evaluate(tmp_path):
    """Real DVC on a copy of the project: record train_retriever, evaluate and embed as run, then edit
    fusion.py, then constrained_decoding.py; `dvc status` names the stages that read them, not embed."""
    root = _copy_project(tmp_path / "project")
    stages = ["train_retriever", "evaluate", "embed"]
    _stand_ins(root, stages)
    _dvc(["commit", "--force", "--quiet", *stages], root)
    assert _changed(root, stages) == {}
    for module in ("components/retrieval/fusion.py", "components/retrieval/constrained_decoding.py"):
        original = (root / module).read_text()
        (root / module).write_text(original + "\n# an edit\n")
        assert _changed(root, stages) == {"train_retriever": {module}, "evaluate": {module}}
        (root / module).write_text(original)
    assert _changed(root, stages) == {}

"""dvc.yaml's stage params: each stage reruns when a value it runs with changes, and only then.

The pipeline here is the project's dvc.yaml and params.yaml in a temporary git + DVC repo, with
small stand-ins for every code, data and output path, recorded in dvc.lock by `dvc commit`
without running a stage; only `resolve_params` runs for real (it writes the resolved params the
other stages list keys of). `dvc status` then names the stages a params edit would rerun.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from components.runtime.config import load_params
from components.runtime.resolved_params import RESOLVED_FILE, resolved_view

# resolved keys that are not inputs of any stage: where outputs go, the flows', serving and
# logging settings, the comparison's own choices (compare runs the steps itself), and how
# embed caches vectors (never what it writes)
NOT_STAGE_INPUTS = ("out_dir", "flows", "serve", "wandb", "eval.variants", "eval.seeds", "eval.compare_dir",
                    "eval.results_dir", "embed.cache", "embed.cache_every_batches")


def _stage_keys() -> dict[str, list[str]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        files = [next(iter(p.items())) for p in stage.get("params", []) if isinstance(p, dict)]
        out[name] = [k for path, keys in files if path.endswith(RESOLVED_FILE) for k in keys or []]
    return out


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    return [leaf for k, v in tree.items()
            for leaf in (_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"])]


def _covered(leaf: str, keys: list[str] | tuple[str, ...]) -> bool:
    return any(leaf == k or leaf.startswith(k + ".") for k in keys)


def test_every_param_is_a_stage_input_or_declared_not_one():
    """A new params key must be listed by the stages that read it (else changing it reruns nothing)."""
    listed = [k for keys in _stage_keys().values() for k in keys]
    leaves = _leaves(resolved_view(load_params(ROOT / "params.yaml")))
    assert [leaf for leaf in leaves if not _covered(leaf, listed) and not _covered(leaf, NOT_STAGE_INPUTS)] == []
    assert [k for k in listed if _covered(k, NOT_STAGE_INPUTS)] == []
    assert "retriever.beam" not in _stage_keys()["train_retriever"]


def _status(root: Path) -> set[str]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return set(repo.status())


def _resolve(root: Path) -> None:
    """Run resolve_params for real (`sa2crq resolve-params`), as `dvc repro` does first."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.reproduce("resolve_params", single_item=True,
                       run_env={"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})


def _commit(root: Path) -> None:
    """Record every stage as up to date in dvc.lock (`dvc commit --force`), without running it."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.commit(None, force=True)


@pytest.fixture(params=["default", "smoke"])
def pipeline(request, tmp_path, monkeypatch) -> Path:
    """The project's pipeline, up to date in dvc.lock, with the given profile active."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["profile"] = request.param
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    from dvc.repo import Repo

    Repo.init(str(root)).close()
    monkeypatch.chdir(root)          # DVC names stages relative to the working directory
    for stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values():
        for entry in [*stage.get("deps", []), *stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]:
            path = root / (next(iter(entry)) if isinstance(entry, dict) else entry)
            if path.name == RESOLVED_FILE or path.exists():
                continue
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(path.name)
            else:
                path.mkdir(parents=True)
                (path / "part").write_text(path.name)
    _resolve(root)
    _commit(root)
    assert _status(root) == set()
    return root


def _edit(root: Path, change: Callable[[dict], None]) -> set[str]:
    """Edit params.yaml and return what `dvc status` finds changed once resolve_params (what `dvc repro`
    runs first) has run; then params.yaml, its resolved file and dvc.lock get their bytes back (what
    resolving the original again would write), so edits do not add up."""
    saved = {path: (root / path).read_bytes() for path in ("params.yaml", f"outputs/{RESOLVED_FILE}", "dvc.lock")}
    params = yaml.safe_load(saved["params.yaml"])
    change(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _status(root) == {"resolve_params"}           # params.yaml is the resolving stage's input alone
    _resolve(root)
    changed = _status(root)
    for path, data in saved.items():
        (root / path).write_bytes(data)
    return changed


def _active(params: dict, section: str) -> dict:
    """The block a key of `section` is read from under the active profile."""
    profile = params["profile"]
    return params["profiles"][profile].setdefault(section, {}) if profile != "default" else params[section]


def test_stages_rerun_on_the_values_they_run_with(pipeline: Path):
    """retriever.beam reruns evaluate alone (not train_retriever); an inactive profile, serving or other
    keys no stage reads rerun nothing; a value a stage runs with, from whichever layer, reruns it."""
    profile = yaml.safe_load((pipeline / "params.yaml").read_text())["profile"]

    def beam(p: dict) -> None:
        _active(p, "retriever")["beam"] = 7

    def no_stage_reads(p: dict) -> None:
        p["profiles"]["other"] = {"embed": {"max_chars": 50}, "retriever": {"epochs": 1}}
        p["serve"]["port"] = 9000
        p["eval"]["seeds"] = [5]

    def embed_chars(p: dict) -> None:
        _active(p, "embed")["max_chars"] = 123

    def smoke_epochs(p: dict) -> None:
        p["profiles"]["smoke"]["retriever"]["epochs"] = 5

    assert _edit(pipeline, beam) == {"evaluate"}
    assert _edit(pipeline, no_stage_reads) == set()
    assert _edit(pipeline, embed_chars) == {"embed"}
    # the smoke profile's block matters only while it is the active profile
    assert _edit(pipeline, smoke_epochs) == ({"train_retriever"} if profile == "smoke" else set())

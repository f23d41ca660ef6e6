"""The real DVC pipeline on the smoke profile: `dvc repro` runs every stage, a second
`dvc repro` is a no-op, a flow on its outputs/ runs through DVC, and changing a tokenizer
param invalidates only what follows it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, data_root

pytestmark = pytest.mark.slow

PROJECT_FILES = ["components", "flows", "dvc.yaml", "params.yaml", "data.dvc", "pyproject.toml", ".dvc/config"]


def _dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def project(tmp_path_factory, smoke_embed_cache) -> Path:
    """A copy of the project set to the smoke profile, with the data in place, as a git repo; its
    outputs/embed_cache holds the smoke catalog's vectors, so the embed stage reads them."""
    root = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / name)
    shutil.copytree(data_root(), root / "data", ignore=shutil.ignore_patterns("*.md"))
    shutil.copytree(smoke_embed_cache, root / "outputs" / "embed_cache")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["profile"] = "smoke"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def _declared_metrics(project: Path) -> set[str]:
    """The metrics files dvc.yaml's stages declare."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    return {next(iter(m)) if isinstance(m, dict) else m for s in stages.values() for m in s.get("metrics", [])}


def _shown_metrics(project: Path) -> dict[str, dict]:
    """`dvc metrics show --json` of the workspace, as {path: the numbers DVC read}."""
    shown = _dvc(["metrics", "show", "--json"], project)
    assert shown.returncode == 0, shown.stderr
    (workspace,) = json.loads(shown.stdout).values()
    return {path: entry["data"] for path, entry in workspace["data"].items()}


def test_repro_runs_every_stage_then_is_a_noop(project: Path):
    """`dvc repro` writes one SID per prepared item, headline metrics for the retriever and the baselines,
    and the metrics DVC reports are the files' numbers; a second repro runs nothing."""
    import pandas as pd

    from flows.tracking import flatten

    first = _dvc(["repro"], project)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = project / "outputs"
    items = pd.read_parquet(out / "prepared" / "items.parquet")
    table = pd.read_parquet(out / "sids" / "sid_table.parquet")
    assert len(items) > 0 and table["item_id"].tolist() == items["item_id"].tolist()
    assert (table["length"] == table["codes"].map(len)).all()
    headline = json.loads((out / "metrics" / "eval.json").read_text())
    resolved = yaml.safe_load((out / "params.resolved.yaml").read_text())
    assert resolved["profile"] == "smoke" and len(headline) >= 1 + len(resolved["eval"]["baselines"])
    assert all(0 <= row[key] <= 1 for row in headline.values() for key in row if key.startswith("recall@"))

    second = _dvc(["repro"], project)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Running stage" not in second.stdout, second.stdout

    shown = _shown_metrics(project)
    declared = _declared_metrics(project)
    assert set(shown) == declared and "outputs/metrics/eval.json" in declared
    for path, numbers in shown.items():                 # DVC leaves out lists (e.g. sid_stats' per-layer rows)
        in_file = {k: v for k, v in flatten(json.loads((project / path).read_text())).items() if not isinstance(v, list)}
        assert numbers and flatten(numbers) == in_file, path


def test_flow_on_outputs_runs_its_steps_through_dvc(project: Path, prefect_server):
    """After the repro a flow on the project's outputs/ finds its step up to date; with the evaluation
    beam changed, the retriever flow resolves the params again and trains nothing."""
    from components.runtime.config import load_params
    from flows.train_retriever_flow import train_retriever_flow

    def flow() -> dict:
        return train_retriever_flow(params=load_params(project / "params.yaml", [f"out_dir={project / 'outputs'}"]))

    assert flow() == {"train_retriever": {"dvc_ran": []}}
    text = (project / "params.yaml").read_text()
    params = yaml.safe_load(text)
    params["profiles"]["smoke"]["retriever"]["beam"] = 7
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert flow() == {"train_retriever": {"dvc_ran": ["resolve_params"]}}
    (project / "params.yaml").write_text(text)
    assert flow() == {"train_retriever": {"dvc_ran": ["resolve_params"]}}
    assert _changed(project) == set()


def _changed(project: Path) -> set[str]:
    status = _dvc(["status", "--json"], project)
    assert status.returncode == 0, status.stderr
    return set(json.loads(status.stdout or "{}"))


def test_changed_tokenizer_param_invalidates_only_downstream(project: Path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tokenizer"]["sarq"]["tau"] = float(params["tokenizer"]["sarq"]["tau"]) + 1.0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _changed(project) == {"resolve_params"}       # the stages read the resolved params it writes
    assert _dvc(["repro", "--single-item", "resolve_params"], project).returncode == 0
    changed = _changed(project)
    assert {"train_head", "train_tail", "assign_ids"} <= changed
    assert not {"prepare", "embed"} & changed

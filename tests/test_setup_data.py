"""scripts/setup.sh pulls the built-in data only when it is used (a built-in dataset, --data or SA2CRQ_DATA=1);
run.sh passes the dataset it is given, test.sh always asks for the data. Run in a copy of the scripts with
a stand-in .venv whose dvc, sa2crq and pytest only record how they were called."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The three scripts, the files setup.sh stamps, an installed-looking .venv; no data/."""
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    for name in ("requirements.txt", "constraints.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    stamp = hashlib.sha256(b"".join((ROOT / n).read_bytes() for n in ("requirements.txt", "constraints.txt",
                                                                        "pyproject.toml"))).hexdigest()[:16]
    bin_ = tmp_path / ".venv" / "bin"
    bin_.mkdir(parents=True)
    (tmp_path / ".venv" / ".sa2crq-installed").write_text(stamp + "\n")
    calls = tmp_path / "calls"
    tools = {"dvc": "", "sa2crq": "", "ruff": "", "lint-imports": "",
             # the real interpreter reads params.yaml; `python -m pytest` is only recorded
             "python": f'[ "$1 $2" = "-m pytest" ] || exec "{sys.executable}" "$@"\n'}
    for tool, body in tools.items():
        (bin_ / tool).write_text(f'#!/usr/bin/env bash\n{body}echo "{tool} $*" >> "{calls}"\n')
        (bin_ / tool).chmod(0o755)
    (bin_ / "activate").write_text(f'export PATH="{bin_}:$PATH"\n')
    return tmp_path


def _run(project: Path, script: str, *args: str, dataset: str = "generic", **env: str) -> list[str]:
    (project / "params.yaml").write_text(f"dataset: {dataset}    # a comment\nseed: 0\n")
    proc = subprocess.run(["bash", f"scripts/{script}", *args], cwd=project, capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items() if k != "SA2CRQ_DATA"}, **env}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = project / "calls"
    return calls.read_text().splitlines() if calls.exists() else []


PULL = "dvc pull -q data.dvc"


@pytest.mark.parametrize("dataset, args, env, pulls", [
    ("generic", (), {}, False),                              # your own catalog: no 3.5-minute pull
    ("amazon-scientific", (), {}, True),
    ("climate-fever", (), {}, True),
    ("generic", ("--data",), {}, True),
    ("generic", (), {"SA2CRQ_DATA": "1"}, True),
    ("amazon-scientific", ("--no-data",), {}, False),
    ("amazon-scientific", (), {"SA2CRQ_DATA": "0"}, False),
    ("generic", ("--dataset", "climate-fever"), {}, True),
    ("amazon-scientific", ("--dataset=generic",), {}, False),
])
def test_setup_pulls_the_data_only_when_used(project, dataset, args, env, pulls):
    assert (PULL in _run(project, "setup.sh", *args, dataset=dataset, **env)) is pulls


def test_setup_pulls_nothing_once_the_data_is_there(project):
    for name in ("amazon-scientific/Scientific.item.json", "climate-fever/climate-fever.jsonl"):
        (project / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (project / "data" / name).write_text("{}")
    assert _run(project, "setup.sh", "--data") == []


@pytest.mark.parametrize("args, env", [(("--pull",), {}), ((), {"SA2CRQ_DATA": "yes"})])
def test_setup_refuses_a_bad_choice_in_one_line(project, args, env):
    (project / "params.yaml").write_text("dataset: generic\n")
    proc = subprocess.run(["bash", "scripts/setup.sh", *args], cwd=project, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "setup.sh:" in proc.stderr


@pytest.mark.parametrize("args, pulls", [((), False), (("--dataset", "climate-fever"), True),
                                         (("--profile", "smoke", "-s", "dataset=amazon-scientific"), True)])
def test_run_pulls_for_the_dataset_it_runs(project, args, pulls):
    calls = _run(project, "run.sh", *args)
    assert (PULL in calls) is pulls and calls[-1] == " ".join(["sa2crq run", *args])


def test_the_tests_get_the_data_whatever_the_dataset(project):
    calls = _run(project, "test.sh", "fast")
    assert calls[0] == PULL and any(c.startswith("python -m pytest") for c in calls)

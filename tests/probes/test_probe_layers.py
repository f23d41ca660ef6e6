"""The layers (issue 22 part 4): pyproject.toml's import-linter contracts hold, they refuse a runtime
module that imports a step, and the step table is built from the step names the schema knows."""
from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache", "--no-logo"]


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports over the packages under `root` (first on the import path), with root's pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([*LINT, "--config", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)


def test_layer_contracts_kept() -> None:
    """The tree keeps its layers: runtime knows no step, retrieval no baseline, baselines no evaluation,
    flows no CLI, and no package's modules import each other in a circle."""
    run = lint(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert ", 0 broken" in run.stdout


def test_contract_refuses_runtime_importing_the_step_table(tmp_path: Path) -> None:
    """The contract has teeth: the import that made the 15-file circle (the schema importing the step table)
    breaks it again in a copy of the tree."""
    for package in ("components", "flows", "sa2crq"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    schema = tmp_path / "components" / "runtime" / "config_schema.py"
    text = schema.read_text()
    anchor = "from components.runtime.errors import ConfigError\n"
    assert anchor in text
    schema.write_text(text.replace(anchor, anchor + "from components.pipeline.steps import STEPS  # noqa: F401\n"))
    run = lint(tmp_path)
    assert run.returncode == 1, run.stdout
    assert "components.runtime is not allowed to import components.pipeline" in run.stdout
    assert "components.runtime.config_schema -> components.pipeline.steps" in run.stdout


def test_step_table_holds_the_named_steps_in_order() -> None:
    """Every function of the step table is a step the schema accepts (flows.pipeline.start / stop), in run
    order: a step added without its name in runtime/step_names.py fails here, not in a user's run."""
    from components.pipeline import steps
    from components.runtime.step_names import STEP_NAMES

    functions = [name for name, f in vars(steps).items()
                 if inspect.isfunction(f) and f.__module__ == steps.__name__]
    assert functions == list(STEP_NAMES)
    assert list(steps.STEPS) == list(STEP_NAMES)
    assert all(steps.STEPS[name].__name__ == name for name in STEP_NAMES)

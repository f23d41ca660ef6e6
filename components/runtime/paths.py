"""Where the project and a run's files are: pure path helpers that import nothing of the project, so any module (a
step, a flow, the locks) can name a path under out_dir without loading the params schema."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]   # the project: dvc.yaml, params.yaml, .dvc/
DVC_FILE = ROOT / "dvc.yaml"
PIPELINE_OUT = "outputs"          # the out_dir that dvc.yaml's paths are written for


def out_path(params: dict, *parts: str) -> Path:
    """A path under the run's output folder (never inside data/)."""
    return Path(params.get("out_dir", "outputs")).joinpath(*parts)


def wandb_dir(params: dict) -> Path:
    """Where W&B writes a run's files (wandb adds its own `wandb/` below): the run's out_dir, so an
    experiment in another out_dir keeps its logs with its outputs; WANDB_DIR overrides."""
    return Path(os.environ.get("WANDB_DIR") or out_path(params))

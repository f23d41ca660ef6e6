"""Shared fixtures: offline env, smoke-profile params in a temp out_dir, a Prefect test server."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")

from components.runtime.runtime_env import set_offline_defaults  # noqa: E402

set_offline_defaults(ROOT)


def data_root() -> Path:
    """The project's dvc-pulled data/, or ../shared/datasets when it has not been pulled."""
    local = ROOT / "data"
    return local if (local / "amazon-scientific").exists() else ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def smoke_params(tmp_path_factory) -> dict:
    """params.yaml with the smoke profile, writing into a fresh temp out_dir."""
    from components.runtime.config import load_params

    out = tmp_path_factory.mktemp("smoke_out")
    return load_params(ROOT / "params.yaml", ["profile=smoke", f"out_dir={out}", f"data.root={data_root()}",
                                              f"eval.results_dir={out / 'results'}"])


@pytest.fixture(scope="session")
def smoke_embedded(smoke_params) -> dict:
    """Smoke params after the real prepare and embed steps ran once for the session."""
    from components.pipeline.stages import get_step

    get_step("prepare")(smoke_params)
    get_step("embed")(smoke_params)
    return smoke_params


@pytest.fixture(scope="session")
def prefect_server():
    """A real temporary Prefect server for flow tests (about 11 s once per session)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield

"""Shared fixtures: offline env, smoke-profile params in a temp out_dir, a Prefect test server, the one
trained smoke pipeline, the service's two trained versions and its server (plain helpers: tests/helpers.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")

from components.runtime.runtime_env import set_offline_defaults  # noqa: E402

set_offline_defaults(ROOT)


# session fixtures that run real steps (the encoder, training): a test using one belongs to the slow tier
SLOW_FIXTURES = ("smoke_embedded", "smoke_embed_cache", "trained")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Stop at collection when a test outside the slow tier uses a slow fixture: the fast tier would pay
    for the real prepare and embed (about 20-50 s) that the slow tier shares."""
    unmarked = [item.nodeid for item in items if item.get_closest_marker("slow") is None
                and set(SLOW_FIXTURES) & set(getattr(item, "fixturenames", ()))]
    if unmarked:
        raise pytest.UsageError(f"mark slow (they use {' / '.join(SLOW_FIXTURES)}): {', '.join(unmarked)}")


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
def smoke_embed_cache(smoke_embedded) -> Path:
    """The smoke data's text vectors as the embed step caches them (<out_dir>/embed_cache). A test copies
    it into the out_dir of a DVC project it runs: the project's embed stage still runs, reading the vectors
    instead of encoding the catalog again (about 35 s on 2 cores; the same bytes, components/data/embed.py)."""
    return Path(smoke_embedded["out_dir"]) / "embed_cache"


@pytest.fixture(scope="session")
def prefect_server():
    """A real temporary Prefect server for flow tests (about 11 s once per session)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def trained(tmp_path_factory, smoke_embedded, prefect_server) -> dict:
    """The trained smoke pipeline (helpers.build_trained), trained once per session and shared by every slow
    test that reads it: {"params": its params (out_dir = the trained folder), "new_items": the held-out items}."""
    from helpers import build_trained

    return build_trained(tmp_path_factory.getbasetemp() / "flows_trained", smoke_embedded)


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict:
    """Two versions t1 and t2 of the tiny catalog (MiniLM-sized vectors), each with its own trained retriever."""
    from helpers import trained_version

    root = tmp_path_factory.mktemp("serve")
    params = trained_version(root / "t1", "t1", epochs=2)
    trained_version(root / "t2", "t2", epochs=3)
    return {"root": root, "params": params}


@pytest.fixture(scope="module")
def server(versions):
    """A real uvicorn server on a free loopback port serving t1, ready, with an httpx client on it."""
    import httpx
    from helpers import serve_params, wait_ready

    from components.serving.server import ServerThread

    params = serve_params(versions, versions["root"] / "t1")
    with ServerThread(params) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        assert client.get("/health").json() == {"status": "ok"}
        wait_ready(client)
        yield {"srv": srv, "client": client, "params": params, "settings": srv.service.settings}

"""Start the service: `serve` for the command line (blocks), `ServerThread` to run it inside a
process that needs the port while it works (tests, benchmarks)."""
from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from components.serving.app import create_app
from components.serving.service import Service
from components.serving.settings import ServeSettings, serve_settings
from components.tokenizers.sid_table import live_version


def build(params: dict, host: str | None = None, port: int | None = None) -> tuple[ServeSettings, Service]:
    """Settings and service; fails now (one line, no open port) when out_dir has no live version."""
    settings = serve_settings(params, host, port)
    for out_dir in filter(None, (settings.out_dir, settings.ab_out_dir)):
        live_version(out_dir)
    return settings, Service(params, settings)


def serve(params: dict, host: str | None = None, port: int | None = None, log_level: str = "info") -> int:
    """Serve the live retriever of params' out_dir (and serve.ab.out_dir) until interrupted."""
    settings, service = build(params, host, port)
    log = logging.getLogger("sa2crq.serve")      # reloads and failed reloads, beside uvicorn's own lines
    log.setLevel(log_level.upper())
    log.addHandler(logging.StreamHandler())
    uvicorn.run(create_app(service), host=settings.host, port=settings.port, log_level=log_level)
    return 0


class ServerThread:
    """`with ServerThread(params) as srv: httpx.get(srv.url + "/health")`: uvicorn in a daemon thread on
    a free loopback port (a socket bound before start, so no other process can take the port meanwhile)."""

    def __init__(self, params: dict, host: str = "127.0.0.1", log_level: str = "warning"):
        settings, self.service = build(params, host, 0)
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets that say so, and without it
        # Nagle + delayed ACKs add 40 ms to every answer
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((settings.host, 0))
        self.url = f"http://{settings.host}:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(self.service), log_level=log_level)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()

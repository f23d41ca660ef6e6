"""Prefect around a flow command: fail fast on a server that does not answer, and keep the
tracebacks of expected errors out of the terminal.

Without the server check a flow command waits while Prefect's client retries (over two minutes)
and ends in three chained tracebacks; it should stop in seconds, naming the URL.

Prefect logs every failed task and flow run with its traceback (a bad new-items file gave 2-4 of
them, 62-112 lines, before the CLI's one line). `flow_logging` drops those console records when
the error is an expected one (what `components.runtime.errors.guarded` prints as one line); the records, with
their tracebacks, still go to the Prefect API (the run's logs) and to <out_dir>/logs/flows.log.
A bug's traceback stays on the console.
"""
from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from components.runtime.errors import Sa2crqError

EXPECTED = (Sa2crqError, FileNotFoundError)   # what the CLI prints as one line (components.runtime.errors.guarded)
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
FLOW_LOG = "flows.log"

TIMEOUT_S = 3.0


def api_url() -> str | None:
    """The server flows will report to: PREFECT_API_URL, else the active Prefect profile's (None = a temporary one)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def check_prefect_api(url: str | None = None, timeout_s: float = TIMEOUT_S) -> None:
    """Sa2crqError naming the URL unless its /health endpoint answers within timeout_s.

    401 / 403 count as an answer (Prefect Cloud wants an API key first, which Prefect's own
    client sends); another HTTP error means the URL is not a working Prefect API."""
    url = url or api_url()
    if not url:
        return
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return
        raise Sa2crqError(f"Prefect server {url} (PREFECT_API_URL) answered HTTP {exc.code} at /health: "
                          "is it the Prefect API URL (usually http://host:4200/api)?") from None
    except (OSError, ValueError) as exc:
        reason = str(getattr(exc, "reason", exc)) or type(exc).__name__
        raise Sa2crqError(f"Prefect server {url} (PREFECT_API_URL) does not answer within {timeout_s:g} s "
                          f"({reason}); start it (prefect server start) or unset PREFECT_API_URL to run the "
                          "flow on a temporary local server") from None


class ExpectedErrorFilter(logging.Filter):
    """Drops Prefect's records of a run that failed with an expected error: the record carrying the
    exception and the run's later ones ("Finished in state Failed(...)"); the CLI prints the error
    as one line. Records of other runs, and of runs that failed with a bug, pass."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: set[tuple[str, str]] = set()   # (logger, run id) of runs that raised an expected error

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(RUN_LOGGERS):
            return True
        run = (record.name, str(getattr(record, "task_run_id" if record.name.endswith("task_runs")
                                        else "flow_run_id", "")))
        if record.exc_info and isinstance(record.exc_info[1], EXPECTED):
            self.failed.add(run)
        return run not in self.failed


class _LazyFileHandler(logging.FileHandler):
    """<out_dir>/logs/flows.log, created at the first record: a run that logs nothing leaves nothing."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(exist_ok=True)
        return super()._open()

    def handleError(self, record: logging.LogRecord) -> None:
        """A log file we cannot write must not print a traceback of its own: the console has the one line."""


def _log_file(out_dir: Path) -> logging.Handler | None:
    """The flow log of out_dir; None where out_dir is not a folder (the command reports that itself)."""
    if not out_dir.is_dir():
        return None
    handler = _LazyFileHandler(out_dir / "logs" / FLOW_LOG, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s - %(message)s"))
    return handler


@contextmanager
def flow_logging(out_dir: str | os.PathLike, debug: bool = False) -> Iterator[None]:
    """While a flow command runs: Prefect's run records also go to <out_dir>/logs/flows.log, and the
    console leaves out those of expected errors (all shown with `debug`)."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()   # Prefect's console handler exists from here on (else only at the first flow)
    debug = debug or os.environ.get("SA2CRQ_DEBUG", "") not in ("", "0")
    console = [] if debug else [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)
                                and not isinstance(h, logging.FileHandler)]
    quiet = ExpectedErrorFilter()
    file = _log_file(Path(out_dir))
    for handler in console:
        handler.addFilter(quiet)
    if file is not None:
        for name in RUN_LOGGERS:
            logging.getLogger(name).addHandler(file)
    try:
        yield
    finally:
        for handler in console:
            handler.removeFilter(quiet)
        if file is not None:
            for name in RUN_LOGGERS:
                logging.getLogger(name).removeHandler(file)
            file.close()

"""Fail fast when PREFECT_API_URL names a Prefect server that does not answer.

Without this check a flow command waits while Prefect's client retries (over two minutes)
and ends in three chained tracebacks; it should stop in seconds, naming the URL.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request

from components.runtime.errors import Sa2crqError

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

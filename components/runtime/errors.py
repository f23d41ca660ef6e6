"""One error type for bad user input, so the CLI can print it plainly and exit non-zero, and the
boundary (`guarded`) that prints it: every entry point (the CLI, DVC stages, the flow server) uses it."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable


class Sa2crqError(ValueError):
    """Base of every expected, user-facing failure: the CLI prints it as one line and exits 2."""


class DataError(Sa2crqError):
    """Bad input data: names the file, the column and the first offending rows."""

    def __init__(self, file: str, message: str, column: str | None = None, rows: Iterable | None = None):
        self.file = str(file)
        self.column = column
        self.rows = [int(r) for r in list(rows)[:5]] if rows is not None else []  # np.int64(3) prints as such
        where = f"{self.file}"
        if column is not None:
            where += f", column '{column}'"
        if self.rows:
            where += f", rows {self.rows}"
        super().__init__(f"{where}: {message}")


class ConfigError(Sa2crqError):
    """A params.yaml value that cannot work, named by its key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"params.yaml '{key}': {message}")


class UnknownNameError(Sa2crqError):
    """A name the user gave (a step, a stage) that does not exist; the message lists the known ones."""


class BusyError(Sa2crqError):
    """Another run holds the lock on this output folder (or the retrain lock)."""


def guarded(run: Callable[[], int], debug: bool = False) -> int:
    """The error boundary of every entry point (CLI, DVC stages, the flow server).

    An expected failure (Sa2crqError: bad params, bad input, a busy output folder; a missing
    file) prints one line and returns exit status 2; with debug or
    SA2CRQ_DEBUG=1 it is raised with its traceback. Any other exception is a bug and keeps
    its traceback."""
    try:
        return run()
    except (Sa2crqError, FileNotFoundError) as exc:
        if debug or os.environ.get("SA2CRQ_DEBUG", "") not in ("", "0"):
            raise
        print(f"sa2crq: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2

"""One error type for bad user input, so the CLI can print it plainly and exit non-zero."""
from __future__ import annotations

from collections.abc import Iterable


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

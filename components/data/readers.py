"""Input files -> DataFrames: every way a file can be unreadable becomes a DataError naming it.

A path that is a directory, a broken link or a symlink loop is said to be that (not "not
found"); bytes that are not UTF-8 are named by column and rows, not a UnicodeDecodeError.
"""
from __future__ import annotations

import codecs
import errno
import io
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.runtime.errors import DataError

TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson")
NOT_UTF8 = "not valid UTF-8 (undecodable bytes or a lone surrogate escape); save the file as UTF-8"
# an undecodable byte is read as this noncharacter, so the parsed table shows the cell it sits in;
# it is looked for only when the strict decoding failed (a real U+FFFE is then no false alarm)
_MARK = "\ufffe"
codecs.register_error("sa2crq-mark", lambda exc: (_MARK, exc.end))
# a JSON "\udc80" escape decodes to a lone surrogate, which cannot be written back as UTF-8
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_OR_MARK = re.compile(f"[\ud800-\udfff{_MARK}]")


def check_file(path: Path, missing: str = "file not found") -> None:
    """DataError saying what `path` is when it is not a readable, non-empty regular file."""
    try:
        info = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(path, "symlink loop: the link resolves back to itself") from None
        if path.is_symlink():
            raise DataError(path, f"broken symlink: its target {os.readlink(path)!r} does not exist") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise DataError(path, missing) from None
        raise DataError(path, f"cannot read: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise DataError(path, "is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise DataError(path, "not a regular file (a pipe, socket or device)")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror}") from None
    if not head.strip():
        raise DataError(path, "empty file")


def _decode(path: Path) -> tuple[str, int | None]:
    """The file's text and, when some bytes are not UTF-8, the line of the first (they read as _MARK)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        return raw.decode("utf-8-sig", "sa2crq-mark"), raw.count(b"\n", 0, exc.start) + 1


def read_text(path: str | os.PathLike, missing: str = "file not found") -> str:
    """A whole UTF-8 text file; DataError with the line of the first byte that is not UTF-8."""
    path = Path(path)
    check_file(path, missing)
    text, bad_line = _decode(path)
    if bad_line is not None:
        raise DataError(path, f"line {bad_line}: {NOT_UTF8}", rows=[bad_line])
    return text


def read_json(path: str | os.PathLike) -> Any:
    """Read one JSON document; DataError with the line number when it is malformed."""
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"malformed JSON on line {exc.lineno}: {exc.msg}", rows=[exc.lineno]) from exc


def _read_jsonl(path: Path, text: str) -> pd.DataFrame:
    """Records as objects (no dtype guess): an int id stays an int, so 7.5 among ints is seen as a float."""
    records: list[dict] = []
    for line_no, line in enumerate(io.StringIO(text), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"malformed JSON on line {line_no}: {exc.msg}", rows=[line_no]) from exc
        if not isinstance(rec, dict):
            raise DataError(path, f"line {line_no} is not a JSON object", rows=[line_no])
        records.append(rec)
    columns = list(dict.fromkeys(k for rec in records for k in rec))
    return pd.DataFrame({c: pd.Series([rec.get(c) for rec in records], dtype=object) for c in columns})


def _has_bad_text(value: Any, pattern: re.Pattern) -> bool:
    if isinstance(value, str):
        return pattern.search(value) is not None
    if isinstance(value, (list, tuple, np.ndarray)):
        return any(_has_bad_text(v, pattern) for v in value)
    if isinstance(value, dict):
        return any(_has_bad_text(k, pattern) or _has_bad_text(v, pattern) for k, v in value.items())
    return False


def check_utf8(df: pd.DataFrame, file: str, bad_line: int | None = None) -> None:
    """DataError at the first column (and its rows) holding text that is not UTF-8; with
    `bad_line` (undecodable bytes were seen) that line when no cell shows them."""
    pattern = _SURROGATE if bad_line is None else _SURROGATE_OR_MARK
    for col in df.columns:
        if _has_bad_text(str(col), pattern):
            raise DataError(file, f"a column name is {NOT_UTF8}", column=ascii(col).strip("'"))
        if df[col].dtype == object or pd.api.types.is_string_dtype(df[col]):
            bad = df[col].map(lambda v: _has_bad_text(v, pattern)).to_numpy(dtype=bool)
            if bad.any():
                raise DataError(file, NOT_UTF8, column=str(col), rows=np.flatnonzero(bad))
    if bad_line is not None:
        raise DataError(file, f"line {bad_line}: {NOT_UTF8}", rows=[bad_line])


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a parquet, CSV or JSONL table; DataError for a missing, empty or malformed file.

    CSV cells are read as strings (ids stay ids, "007" stays "007"); an empty cell is null.
    JSONL values keep their JSON types.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(path, f"unsupported file type {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")
    check_file(path)
    bad_line = None
    if suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataError(path, f"not a readable parquet file: {exc}") from exc
    else:
        text, bad_line = _decode(path)
        if suffix == ".csv":
            try:
                df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])
            except pd.errors.EmptyDataError as exc:
                raise DataError(path, "empty file") from exc
            except pd.errors.ParserError as exc:
                raise DataError(path, f"malformed CSV: {exc}") from exc
        else:
            df = _read_jsonl(path, text)
    if len(df) == 0:
        raise DataError(path, "empty file: no rows")
    check_utf8(df, str(path), bad_line)
    return df

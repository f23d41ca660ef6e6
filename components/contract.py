"""The data contract (docs/ARCHITECTURE.md): readers and checks that fail early and say where.

Every check raises `DataError(file, message, column=, rows=)`, where `rows` are 0-based data
row positions (JSONL: 1-based line numbers), so a user can find the bad record at once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from components.errors import DataError

SPLITS = ("train", "valid", "test")
GROUPS = ("head", "tail", "cold")
ITEM_INPUT_COLUMNS = ("item_id", "text")
ITEM_COLUMNS = ("item_id", "text", "popularity", "group")
QUERY_COLUMNS = ("query_id", "split", "order", "history", "text", "targets", "emb_row")
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson")


def _rows(mask: pd.Series | np.ndarray) -> list[int]:
    """Positions of the first offending rows (DataError keeps five)."""
    return np.flatnonzero(np.asarray(mask, dtype=bool))[:5].tolist()


def _check_nonempty(df: pd.DataFrame, file: str) -> None:
    if len(df) == 0:
        raise DataError(file, "empty file: no rows")


def require_columns(df: pd.DataFrame, columns: Iterable[str], file: str) -> None:
    """Fail on the first missing column, listing the columns the file does have."""
    for col in columns:
        if col not in df.columns:
            raise DataError(file, f"missing column (file has: {', '.join(map(str, df.columns))})", column=col)


def _check_ids(df: pd.DataFrame, column: str, file: str) -> None:
    ids = df[column]
    missing = ids.isna() | (ids.astype(str).str.strip() == "")
    if missing.any():
        raise DataError(file, "null or empty id", column=column, rows=_rows(missing))
    dup = ids.astype(str).duplicated(keep="first")
    if dup.any():
        first = ids.astype(str)[dup].iloc[0]
        raise DataError(file, f"duplicate id {first!r}", column=column, rows=_rows(dup))


def _blank_text(texts: pd.Series) -> pd.Series:
    return texts.isna() | (texts.astype(str).str.strip() == "")


def validate_items(df: pd.DataFrame, file: str, columns: Iterable[str] = ITEM_INPUT_COLUMNS) -> None:
    """Items: unique non-empty ids, non-empty text; popularity / group valid where present."""
    file = str(file)
    _check_nonempty(df, file)
    require_columns(df, columns, file)
    _check_ids(df, "item_id", file)
    blank = _blank_text(df["text"])
    if blank.any():
        raise DataError(file, "empty or null text", column="text", rows=_rows(blank))
    if "popularity" in df.columns:
        pop = pd.to_numeric(df["popularity"], errors="coerce")
        bad = pop.isna() | (pop < 0) | (pop != pop.round())
        if bad.any():
            raise DataError(file, "popularity must be an integer >= 0", column="popularity", rows=_rows(bad))
    if "group" in df.columns:
        bad = ~df["group"].isin(GROUPS)
        if bad.any():
            raise DataError(file, f"group must be one of {GROUPS}", column="group", rows=_rows(bad))


def _unknown_ids(lists: pd.Series, known: set[str]) -> pd.Series:
    """Per row: does the list hold an id that is not in `known`?"""
    return lists.map(lambda ids: any(str(i) not in known for i in ids))


def validate_queries(df: pd.DataFrame, items_df: pd.DataFrame, file: str,
                     columns: Iterable[str] = QUERY_COLUMNS) -> None:
    """Queries in normalised form (lists already parsed): ids, splits, targets, known items.

    Every query needs at least one target, and either a non-empty text or a non-empty history;
    every id in `history` and `targets` must be an item of `items_df`.
    """
    file = str(file)
    _check_nonempty(df, file)
    require_columns(df, columns, file)
    _check_ids(df, "query_id", file)
    bad = ~df["split"].isin(SPLITS)
    if bad.any():
        raise DataError(file, f"split must be one of {SPLITS}", column="split", rows=_rows(bad))
    no_target = df["targets"].map(len) == 0
    if no_target.any():
        raise DataError(file, "query without a target", column="targets", rows=_rows(no_target))
    no_input = _blank_text(df["text"]) & (df["history"].map(len) == 0)
    if no_input.any():
        raise DataError(file, "query has neither text nor history", column="text", rows=_rows(no_input))
    known = set(items_df["item_id"].astype(str))
    for col in ("history", "targets"):
        unknown = _unknown_ids(df[col], known)
        if unknown.any():
            first = next(i for i in df[col][unknown].iloc[0] if str(i) not in known)
            raise DataError(file, f"unknown item id {str(first)!r} (not in the items)", column=col,
                            rows=_rows(unknown))
    order = pd.to_numeric(df["order"], errors="coerce")
    bad = order.isna() | (order != order.round())
    if bad.any():
        raise DataError(file, "order must be an integer", column="order", rows=_rows(bad))
    if "emb_row" in df.columns:
        is_text = ~_blank_text(df["text"])
        expected = np.where(is_text, np.cumsum(is_text) - 1, -1)
        bad = df["emb_row"].to_numpy() != expected
        if bad.any():
            raise DataError(file, "emb_row must number text queries 0.. in row order, -1 otherwise",
                            column="emb_row", rows=_rows(bad))


def _read_jsonl(path: Path) -> pd.DataFrame:
    records: list[dict] = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, f"malformed JSON on line {line_no}: {exc.msg}", rows=[line_no]) from exc
            if not isinstance(rec, dict):
                raise DataError(path, f"line {line_no} is not a JSON object", rows=[line_no])
            records.append(rec)
    return pd.DataFrame.from_records(records)


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0 or not path.read_bytes()[:4096].strip():
        raise DataError(path, "empty file")


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a parquet, CSV or JSONL table; DataError for a missing, empty or malformed file.

    CSV cells are read as strings (ids stay ids, "007" stays "007"); an empty cell is null.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(path, f"unsupported file type {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")
    _check_file(path)
    if suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataError(path, f"not a readable parquet file: {exc}") from exc
    elif suffix == ".csv":
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        except pd.errors.EmptyDataError as exc:
            raise DataError(path, "empty file") from exc
        except pd.errors.ParserError as exc:
            raise DataError(path, f"malformed CSV: {exc}") from exc
    else:
        df = _read_jsonl(path)
    _check_nonempty(df, str(path))
    return df


def read_json(path: str | os.PathLike) -> Any:
    """Read one JSON document; DataError with the line number when it is malformed."""
    path = Path(path)
    _check_file(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"malformed JSON on line {exc.lineno}: {exc.msg}", rows=[exc.lineno]) from exc


def _parse_list(value: Any) -> list[str]:
    """A list of ids from a native list, a JSON array string, or a space-separated string."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        parsed = json.loads(text)
        if not isinstance(parsed, list):
            raise ValueError("not a JSON array")
        return [str(v) for v in parsed]
    return text.split()


def list_column(df: pd.DataFrame, column: str, file: str) -> pd.Series:
    """A column of id lists in any contract spelling; a value that is none of them is a DataError at its row."""
    out = []
    for pos, value in enumerate(df[column]):
        try:
            out.append(_parse_list(value))
        except (ValueError, json.JSONDecodeError) as exc:
            raise DataError(file, f"cannot read a list of ids from {value!r}: {exc}", column=column, rows=[pos]) from exc
    return pd.Series(out, index=df.index, dtype=object)

"""The data contract (docs/ARCHITECTURE.md): checks that fail early and say where.

Every check raises `DataError(file, message, column=, rows=)`, where `rows` are 0-based data
row positions, so a user can find the bad record at once. Ids are strings or integers
(components/data/values.py), texts are non-empty strings, integer columns are finite integers,
and every split the pipeline needs has queries.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from components.runtime.errors import DataError
from components.data.readers import read_table
from components.data.values import id_string, int_value, is_null

SPLITS = ("train", "valid", "test")
GROUPS = ("head", "tail", "cold")
ITEM_INPUT_COLUMNS = ("item_id", "text")
ITEM_COLUMNS = ("item_id", "text", "popularity", "group")
QUERY_COLUMNS = ("query_id", "split", "order", "history", "text", "targets", "emb_row")
# why each split must be there: without one, a later step fails after hours, or quietly degrades
SPLIT_USES = {"train": "popularity, head / tail groups and training pairs",
              "valid": "the best epoch, the fusion weights and the SASRec baselines",
              "test": "the evaluation"}


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
    missing = ids.map(lambda v: is_null(v) or str(v).strip() == "")
    if missing.any():
        raise DataError(file, "null or empty id", column=column, rows=_rows(missing))
    dup = ids.astype(str).duplicated(keep="first")
    if dup.any():
        first = ids.astype(str)[dup].iloc[0]
        raise DataError(file, f"duplicate id {first!r}", column=column, rows=_rows(dup))


def _parsed(values: pd.Series, parse: Callable[[Any], Any], file: str, column: str) -> list:
    """`parse` on every value; its first ValueError becomes a DataError at that row."""
    out = []
    for pos, value in enumerate(values):
        try:
            out.append(parse(value))
        except ValueError as exc:
            raise DataError(file, str(exc), column=column, rows=[pos]) from None
    return out


def id_column(values: pd.Series, file: str, column: str) -> pd.Series:
    """Ids as strings (null stays None); a float such as 7.5, a boolean or a list is refused at its row."""
    return pd.Series(_parsed(values, id_string, file, column), index=values.index, dtype=object)


def int_column(values: pd.Series, file: str, column: str, minimum: int | None = None) -> pd.Series:
    """Finite integers that fit int64 (at least `minimum`), from ints, whole floats or digits."""
    parsed = [int_value(v) for v in values]
    bad = [p is None or (minimum is not None and p < minimum) for p in parsed]
    if any(bad):
        floor = "" if minimum is None else f" >= {minimum}"
        raise DataError(file, f"{column} must be a finite integer{floor} (int64)", column=column, rows=_rows(bad))
    return pd.Series(parsed, index=values.index, dtype="int64")


def check_texts(texts: pd.Series, file: str, column: str = "text", required: bool = True) -> None:
    """Text is a string (never a list or a number turned into "[]" or "5"); non-empty when required."""
    not_str = texts.map(lambda t: not is_null(t) and not isinstance(t, str))
    if not_str.any():
        first = texts[not_str].iloc[0]
        raise DataError(file, f"text must be a string, got {type(first).__name__} {str(first)[:40]!r}",
                        column=column, rows=_rows(not_str))
    if required:
        blank = _blank_text(texts)
        if blank.any():
            raise DataError(file, "empty or null text", column=column, rows=_rows(blank))


def check_writable(df: pd.DataFrame, file: str, skip: Iterable[str] = ITEM_COLUMNS, rows_from: int = 0) -> None:
    """Columns kept as they are must go to parquet: one value type per column, checked before any write.

    Rows are reported from position `rows_from` on, numbered from it (the new part of a grown table)."""
    for col in df.columns:
        if col in skip:
            continue
        try:
            pa.array(df[col], from_pandas=True)
        except (pa.ArrowException, OverflowError) as exc:
            kinds = df[col].map(lambda v: "null" if is_null(v) else type(v).__name__).to_numpy()
            seen = kinds[kinds != "null"]
            bad = (kinds != "null") & (kinds != seen[0])
            raise DataError(file, f"values of mixed or unsupported types ({', '.join(sorted(set(seen)))}) cannot be "
                                  f"stored: {exc}", column=str(col), rows=_rows(bad[rows_from:])) from None


def _blank_text(texts: pd.Series) -> pd.Series:
    return texts.map(lambda t: is_null(t) or str(t).strip() == "")


def validate_items(df: pd.DataFrame, file: str, columns: Iterable[str] = ITEM_INPUT_COLUMNS) -> None:
    """Items: unique non-empty ids, non-empty string text; popularity / group valid where present."""
    file = str(file)
    _check_nonempty(df, file)
    require_columns(df, columns, file)
    _check_ids(df, "item_id", file)
    check_texts(df["text"], file)
    if "popularity" in df.columns:
        int_column(df["popularity"], file, "popularity", minimum=0)
    if "group" in df.columns:
        bad = ~df["group"].isin(GROUPS)
        if bad.any():
            raise DataError(file, f"group must be one of {GROUPS}", column="group", rows=_rows(bad))


def read_items(path: str | os.PathLike) -> pd.DataFrame:
    """An items file (item_id, text, extra columns) checked and normalised: ids and texts as str."""
    file = str(path)
    df = read_table(path)
    require_columns(df, ITEM_INPUT_COLUMNS, file)
    df["item_id"] = id_column(df["item_id"], file, "item_id")
    validate_items(df, file)
    check_writable(df, file)
    df["item_id"] = df["item_id"].astype("str")
    df["text"] = df["text"].astype("str")
    return df.reset_index(drop=True)


def _unknown_ids(lists: pd.Series, known: set[str]) -> pd.Series:
    """Per row: does the list hold an id that is not in `known`?"""
    return lists.map(lambda ids: any(str(i) not in known for i in ids))


def check_splits(splits: pd.Series, file: str) -> None:
    """Every split the pipeline needs has at least one query (SPLIT_USES says what for)."""
    missing = [s for s in SPLITS if not (splits == s).any()]
    if missing:
        need = "; ".join(f"{s}: {SPLIT_USES[s]}" for s in missing)
        raise DataError(file, f"no {' / '.join(repr(s) for s in missing)} queries; the pipeline needs them ({need})",
                        column="split")


def validate_queries(df: pd.DataFrame, items_df: pd.DataFrame, file: str,
                     columns: Iterable[str] = QUERY_COLUMNS) -> None:
    """Queries in normalised form (lists already parsed): ids, splits, targets, known items.

    Every query needs at least one target, and either a non-empty text or a non-empty history;
    every id in `history` and `targets` must be an item of `items_df`; `order` is a finite
    integer; train, valid and test each have queries.
    """
    file = str(file)
    _check_nonempty(df, file)
    require_columns(df, columns, file)
    _check_ids(df, "query_id", file)
    bad = ~df["split"].isin(SPLITS)
    if bad.any():
        raise DataError(file, f"split must be one of {SPLITS}", column="split", rows=_rows(bad))
    check_texts(df["text"], file, required=False)
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
    int_column(df["order"], file, "order")
    check_splits(df["split"], file)
    if "emb_row" in df.columns:
        is_text = ~_blank_text(df["text"])
        expected = np.where(is_text, np.cumsum(is_text) - 1, -1)
        bad = df["emb_row"].to_numpy() != expected
        if bad.any():
            raise DataError(file, "emb_row must number text queries 0.. in row order, -1 otherwise",
                            column="emb_row", rows=_rows(bad))


def _list_id(value: Any) -> str:
    ident = id_string(value)
    if ident is None:
        raise ValueError("a null id inside the list")
    return ident


def _parse_list(value: Any) -> list[str]:
    """A list of ids from a native list, a JSON array string, a space-separated string or one bare id."""
    if is_null(value):
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_list_id(v) for v in value]
    if isinstance(value, dict):
        raise ValueError("an object, not a list")
    if not isinstance(value, str):
        return [_list_id(value)]
    text = value.strip()
    if text.startswith("["):
        parsed = json.loads(text)
        if not isinstance(parsed, list):
            raise ValueError("not a JSON array")
        return [_list_id(v) for v in parsed]
    return text.split()


def list_column(df: pd.DataFrame, column: str, file: str) -> pd.Series:
    """A column of id lists in any contract spelling; a value that is none of them is a DataError at its row."""
    out = []
    for pos, value in enumerate(df[column]):
        try:
            out.append(_parse_list(value))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise DataError(file, f"cannot read a list of ids from {str(value)[:60]!r}: {exc}", column=column,
                            rows=[pos]) from None
    return pd.Series(out, index=df.index, dtype=object)


def single_id_lists(values: pd.Series, file: str, column: str) -> pd.Series:
    """A column of single ids (`target`) as one-element lists; null or blank gives []."""
    ids = _parsed(values, id_string, file, column)
    return pd.Series([[] if i is None or not i.strip() else [i.strip()] for i in ids], index=values.index,
                     dtype=object)

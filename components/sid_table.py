"""SID tables: build, save / load, import an external table, and check issued SIDs are stable.

File contract (docs/ARCHITECTURE.md): `item_id` (str), `codes` (list[int]), `length` (int),
`stage` (head | tail | new | import | full), `version` (str); one row per item.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from components.atomic import write_parquet
from components.errors import DataError

SID_COLUMNS = ("item_id", "codes", "length", "stage", "version")
STAGES = ("head", "tail", "new", "import", "full")


def make_sid_table(item_ids: Sequence[str], codes: Sequence[Sequence[int]], stages: Sequence[str] | str,
                   version: str) -> pd.DataFrame:
    """One row per item; `codes` already truncated to each item's length."""
    code_lists = [[int(c) for c in row] for row in codes]
    stage_col = [stages] * len(code_lists) if isinstance(stages, str) else list(stages)
    return pd.DataFrame({"item_id": [str(i) for i in item_ids], "codes": code_lists,
                         "length": np.array([len(c) for c in code_lists], dtype=np.int64),
                         "stage": stage_col, "version": [version] * len(code_lists)})


def write_sid_table(df: pd.DataFrame, path: str | os.PathLike) -> None:
    validate_sid_table(df, str(path))
    write_parquet(df[list(SID_COLUMNS)], path)


def read_sid_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read and check a sids/sid_table.parquet; codes come back as lists of int."""
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "SID table not found (run assign_ids first)")
    df = pd.read_parquet(path)
    for col in SID_COLUMNS:
        if col not in df.columns:
            raise DataError(str(path), f"missing column (file has: {', '.join(map(str, df.columns))})", column=col)
    df["codes"] = [[int(c) for c in row] for row in df["codes"]]
    validate_sid_table(df, str(path))
    return df


def validate_sid_table(df: pd.DataFrame, file: str) -> None:
    dup = df["item_id"].duplicated()
    if dup.any():
        raise DataError(file, "duplicate item_id", column="item_id", rows=np.flatnonzero(dup))
    bad_len = np.array([len(c) for c in df["codes"]]) != df["length"].to_numpy()
    if bad_len.any():
        raise DataError(file, "length differs from the number of codes", column="length", rows=np.flatnonzero(bad_len))
    empty = df["length"].to_numpy() < 1
    if empty.any():
        raise DataError(file, "empty SID", column="codes", rows=np.flatnonzero(empty))
    bad_stage = ~df["stage"].isin(STAGES)
    if bad_stage.any():
        raise DataError(file, f"stage must be one of {STAGES}", column="stage", rows=np.flatnonzero(bad_stage))


def sid_strings(df: pd.DataFrame) -> pd.Series:
    """Codes joined by '-' (the `sid` column of ranked results)."""
    return df["codes"].map(lambda c: "-".join(str(int(x)) for x in c))


# ---- import of an external SID table -------------------------------------------------------

def _read_import_file(path: Path) -> pd.DataFrame:
    """JSON ({item_id: [codes]} or [{item_id, codes}, ...]) or parquet (item_id, codes)."""
    if not path.exists():
        raise DataError(str(path), "import file not found (tokenizer.import_path)")
    if path.suffix.lower() == ".parquet":
        df = pd.read_parquet(path)
    elif path.suffix.lower() == ".json":
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(str(path), f"malformed JSON at line {exc.lineno}: {exc.msg}") from None
        if isinstance(obj, dict):
            df = pd.DataFrame({"item_id": list(obj.keys()), "codes": list(obj.values())})
        elif isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
            df = pd.DataFrame(obj)
        else:
            raise DataError(str(path), "JSON must be an object {item_id: [codes]} or a list of {item_id, codes}")
    else:
        raise DataError(str(path), "import file must be .json or .parquet")
    for col in ("item_id", "codes"):
        if col not in df.columns:
            raise DataError(str(path), f"missing column (file has: {', '.join(map(str, df.columns))})", column=col)
    return df


def _is_code_list(value: object) -> bool:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        return False
    if len(value) == 0 or any(isinstance(v, (bool, np.bool_)) for v in value):
        return False
    arr = np.asarray(value, dtype=object)
    return arr.ndim == 1 and all(isinstance(v, (int, np.integer)) and v >= 0 for v in arr)


def read_import(path: str | os.PathLike, catalog_ids: Sequence[str]) -> list[list[int]]:
    """Codes for every catalog item, in catalog order, from an external SID table.

    DataError (file, column, first rows) for duplicate or unknown item ids, catalog items
    the file misses, and codes that are not non-empty lists of non-negative integers."""
    path = Path(path)
    df = _read_import_file(path)
    ids = df["item_id"].astype(str)
    dup = ids.duplicated()
    if dup.any():
        raise DataError(str(path), f"duplicate item_id {ids[dup].iloc[0]!r}", column="item_id", rows=np.flatnonzero(dup))
    known = set(map(str, catalog_ids))
    unknown = ~ids.isin(known)
    if unknown.any():
        raise DataError(str(path), f"item ids not in the catalog: {ids[unknown].head(5).tolist()}",
                        column="item_id", rows=np.flatnonzero(unknown))
    bad = ~df["codes"].map(_is_code_list).to_numpy(dtype=bool)
    if bad.any():
        raise DataError(str(path), "codes must be non-empty lists of non-negative integers",
                        column="codes", rows=np.flatnonzero(bad))
    by_id = dict(zip(ids, df["codes"]))
    missing = [i for i in map(str, catalog_ids) if i not in by_id]
    if missing:
        raise DataError(str(path), f"{len(missing)} catalog items have no SID, e.g. {missing[:5]}", column="item_id")
    return [[int(c) for c in by_id[i]] for i in map(str, catalog_ids)]


# ---- stability ---------------------------------------------------------------------------

def changed_sids(old: pd.DataFrame, new: pd.DataFrame) -> list[str]:
    """Item ids of `old` whose SID differs in `new` or that `new` lost."""
    new_codes = dict(zip(new["item_id"].astype(str), new["codes"].map(lambda c: tuple(int(x) for x in c))))
    return [i for i, c in zip(old["item_id"].astype(str), old["codes"])
            if new_codes.get(i) != tuple(int(x) for x in c)]


def assert_stable(old: pd.DataFrame, new: pd.DataFrame, file: str) -> None:
    """DataError naming the items whose issued SID changed (an issued SID never changes
    unless a full rebuild is asked for)."""
    changed = changed_sids(old, new)
    if changed:
        pos = np.flatnonzero(new["item_id"].astype(str).isin(set(changed)))
        raise DataError(file, f"{len(changed)} issued SIDs changed or vanished, e.g. {changed[:5]}",
                        column="codes", rows=pos)

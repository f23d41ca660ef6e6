"""Property tests (hypothesis) of the input readers: whatever a user's items, queries or SID
import file holds, it is either accepted and read back as meant, or refused with a DataError;
never another exception. Few examples each (the suite runs on 2 cores)."""
from __future__ import annotations

import copy
import csv
import json
import math
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from components.data.adapters import load_generic
from components.data.contract import read_items
from components.data.values import EXACT_FLOAT, INT64_MAX, INT64_MIN
from components.runtime.config import load_params
from components.runtime.errors import DataError
from components.tokenizers.sid_table import read_import

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FORMATS = ("csv", "jsonl", "parquet")

texts = st.text(max_size=12)
ints = st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([2.0, 7.5, -0.0, 1e30])
any_value = st.none() | st.booleans() | texts | ints | floats | st.lists(texts, max_size=2)


def _meant_id(value) -> str | None:
    """What an id value means by the contract; None when it must be refused."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) <= EXACT_FLOAT:
        return str(int(value))
    return None


def _csv_cell(value) -> str:
    """A CSV holds strings: a value as a user's spreadsheet would write it (null: empty)."""
    return "" if value is None else value if isinstance(value, str) else json.dumps(value)


def _write(path: Path, columns: dict[str, list]) -> Path:
    fmt = path.suffix[1:]
    n = len(next(iter(columns.values())))
    if fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(list(columns))
            writer.writerows([[_csv_cell(columns[c][i]) for c in columns] for i in range(n)])
    elif fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as fh:
            for i in range(n):
                fh.write(json.dumps({c: columns[c][i] for c in columns}) + "\n")
    else:
        pd.DataFrame({c: pd.Series(v, dtype=object) for c, v in columns.items()}).to_parquet(path)
    return path


def _as_read(value, fmt: str):
    """The value a reader sees: a CSV cell is its string (empty = null)."""
    if fmt != "csv":
        return value
    cell = _csv_cell(value)
    return cell if cell else None


good_texts = st.text(min_size=1, max_size=12).filter(str.strip)
good_ids = good_texts | st.integers(min_value=-(2 ** 53), max_value=2 ** 53)


@st.composite
def item_columns(draw) -> tuple[str, dict[str, list]]:
    """An items table in one format: valid-looking half the time, hostile otherwise; parquet
    columns hold one type each (pyarrow writes nothing else)."""
    fmt = draw(st.sampled_from(FORMATS))
    n = draw(st.integers(1, 6))
    if not draw(st.booleans()):
        ids = draw(st.lists(good_ids if fmt != "parquet" else good_texts, min_size=n, max_size=n,
                            unique_by=lambda v: _meant_id(_as_read(v, fmt))))
        return fmt, {"item_id": ids, "text": draw(st.lists(good_texts, min_size=n, max_size=n)),
                     "brand": draw(st.lists(st.none() | good_texts, min_size=n, max_size=n))}
    if fmt == "parquet":
        id_kind = draw(st.sampled_from([texts, st.integers(INT64_MIN, INT64_MAX), st.floats()]))
        ids = draw(st.lists(st.none() | id_kind, min_size=n, max_size=n))
        text_col = draw(st.lists(st.none() | texts, min_size=n, max_size=n))
        extra = draw(st.lists(st.none() | st.sampled_from([1, 2, 3]), min_size=n, max_size=n))
    else:
        ids = draw(st.lists(any_value, min_size=n, max_size=n))
        text_col = draw(st.lists(st.none() | texts | ints | st.lists(texts, max_size=1), min_size=n, max_size=n))
        extra = draw(st.lists(any_value, min_size=n, max_size=n))
    return fmt, {"item_id": ids, "text": text_col, "brand": extra}


@SETTINGS
@given(item_columns())
def test_items_file_is_read_as_meant_or_refused(table):
    fmt, columns = table
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp) / f"items.{fmt}", columns)
        try:
            items = read_items(path)
        except DataError as exc:
            event(f"refused: {str(exc).split(': ', 1)[-1][:30]}")
            return
        event("accepted")
        ids = [_meant_id(_as_read(v, fmt)) for v in columns["item_id"]]
        meant_texts = [_as_read(t, fmt) for t in columns["text"]]
        assert None not in ids and len(set(ids)) == len(ids)
        assert items["item_id"].tolist() == ids
        assert all(isinstance(t, str) and t.strip() for t in meant_texts)
        assert items["text"].tolist() == meant_texts
        items.to_parquet(Path(tmp) / "out.parquet", index=False)  # what prepare writes: never fails now
        back = pd.read_parquet(Path(tmp) / "out.parquet")
        assert back["item_id"].tolist() == ids and back["text"].tolist() == meant_texts


def test_good_items_are_never_refused():
    """The other direction on a fixed case per format: valid ids (str, int, whole float) and texts pass."""
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in FORMATS:
            ids = ["007", 8, 9.0] if fmt != "parquet" else [7.0, 8.0, 9.0]
            items = read_items(_write(Path(tmp) / f"items.{fmt}", {"item_id": ids, "text": ["a", "b ", "ü"]}))
            want = ["007", "8", "9.0"] if fmt == "csv" else ["007", "8", "9"] if fmt == "jsonl" else ["7", "8", "9"]
            assert items["item_id"].tolist() == want and items["text"].tolist() == ["a", "b ", "ü"]


ITEM_IDS = ["a", "b", "7"]
splits = st.sampled_from(["train", "valid", "test", " test ", "dev"]) | st.none() | ints
id_lists = st.lists(st.sampled_from(ITEM_IDS) | st.sampled_from([7, 7.0, 7.5, "zz", None, True]), max_size=3)
orders = st.none() | ints | floats | st.sampled_from(["3", "1e3", "x", " 4 "])


@st.composite
def query_columns(draw) -> tuple[str, dict[str, list]]:
    """A queries table: valid-looking half the time (every split, known ids), hostile otherwise."""
    fmt = draw(st.sampled_from(("csv", "jsonl")))
    if not draw(st.booleans()):
        n = draw(st.integers(3, 6))
        col = lambda strategy: draw(st.lists(strategy, min_size=n, max_size=n))  # noqa: E731
        known = st.sampled_from(ITEM_IDS) | st.just(7)
        return fmt, {"query_id": draw(st.lists(good_ids, min_size=n, max_size=n,
                                               unique_by=lambda v: _meant_id(_as_read(v, fmt)))),
                     "split": ["train", "valid", "test"] + col(st.sampled_from(["train", "valid", "test"]))[3:],
                     "history": col(st.lists(known, max_size=3)), "targets": col(st.lists(known, min_size=1, max_size=2)),
                     "text": col(good_texts), "order": col(st.integers(INT64_MIN, INT64_MAX) | st.just(2.0))}
    n = draw(st.integers(1, 6))
    col = lambda strategy: draw(st.lists(strategy, min_size=n, max_size=n))  # noqa: E731
    return fmt, {"query_id": col(any_value), "split": col(splits), "history": col(id_lists),
                 "targets": col(id_lists), "text": col(st.none() | texts | ints), "order": col(orders)}


@pytest.fixture(scope="module")
def base_params() -> dict:
    return load_params(ROOT / "params.yaml", ["dataset=generic"])


def _list_meant(value, fmt: str) -> list[str] | None:
    """A list column as meant: ids by the contract, None when an id must be refused."""
    if fmt == "csv":
        value = json.loads(_csv_cell(value)) if value else []
    out = [_meant_id(v) if not isinstance(v, str) else v for v in value]
    return None if None in out else out


@SETTINGS
@given(query_columns())
def test_queries_file_is_read_as_meant_or_refused(base_params, table):
    fmt, columns = table
    with tempfile.TemporaryDirectory() as tmp:
        items = _write(Path(tmp) / "items.csv", {"item_id": ITEM_IDS, "text": ["x", "y", "z"]})
        path = _write(Path(tmp) / f"queries.{fmt}", columns)
        params = copy.deepcopy(base_params)
        params["data"]["generic"] = {"items": str(items), "queries": str(path)}
        try:
            _, queries = load_generic(params)
        except DataError as exc:
            event(f"refused: {str(exc).split(': ', 1)[-1][:30]}")
            return
        event("accepted")
        n = len(columns["query_id"])
        assert queries["query_id"].tolist() == [_meant_id(_as_read(v, fmt)) for v in columns["query_id"]]
        assert queries["split"].tolist() == [str(_as_read(s, fmt)).strip() for s in columns["split"]]
        assert set(queries["split"]) == {"train", "valid", "test"}
        assert [list(h) for h in queries["history"]] == [_list_meant(h, fmt) for h in columns["history"]]
        assert [list(t) for t in queries["targets"]] == [_list_meant(t, fmt) for t in columns["targets"]]
        meant_text = [_as_read(t, fmt) for t in columns["text"]]
        assert [None if pd.isna(t) else t for t in queries["text"]] == \
            [t if isinstance(t, str) and t.strip() else None for t in meant_text]
        assert all(t is None or isinstance(t, str) for t in meant_text) and len(queries) == n
        assert queries["order"].dtype == "int64"


codes = st.lists(st.integers(-2, 2 ** 64) | st.sampled_from([1.0, 2.5, True]), max_size=3)


@st.composite
def sid_files(draw) -> tuple[str, str, list, list]:
    """An import file (format, tokenizer.import_unknown, ids, codes): valid-looking half the time."""
    fmt, unknown = draw(st.sampled_from(("dict.json", "records.json", "parquet"))), draw(st.sampled_from(["error", "drop"]))
    catalog = ["a", "b", "c"]
    pool = catalog + ["zz", "7"]
    if not draw(st.booleans()):  # valid-looking: every catalog item once, maybe unknown ones (drop)
        extra = draw(st.lists(st.sampled_from(["zz", "7"]), max_size=2, unique=True)) if unknown == "drop" else []
        ids = draw(st.permutations(catalog + extra))
        good = st.lists(st.integers(0, INT64_MAX), min_size=1, max_size=3)
        return fmt, unknown, ids, draw(st.lists(good, min_size=len(ids), max_size=len(ids)))
    if fmt == "parquet":
        ids = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=5))
        rows = draw(st.lists(st.lists(st.integers(-1, INT64_MAX), min_size=0, max_size=3),
                             min_size=len(ids), max_size=len(ids)))
    else:
        ids = draw(st.lists(st.sampled_from(pool) | (st.sampled_from([7, 7.0, 7.5, None]) if fmt == "records.json"
                                                     else st.nothing()), min_size=1, max_size=5))
        rows = draw(st.lists(codes, min_size=len(ids), max_size=len(ids)))
    return fmt, unknown, ids, rows


def _is_codes(row) -> bool:
    return bool(row) and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= INT64_MAX for c in row)


@SETTINGS
@given(sid_files())
def test_sid_import_is_read_as_meant_or_refused(sid_file):
    fmt, unknown, ids, rows = sid_file
    catalog = ["a", "b", "c"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"sids.{fmt.split('.')[-1]}"
        if fmt == "dict.json":
            path.write_text(json.dumps(dict(zip(ids, rows))))
            ids, rows = list(dict(zip(ids, rows))), list(dict(zip(ids, rows)).values())
        elif fmt == "records.json":
            path.write_text(json.dumps([{"item_id": i, "codes": c} for i, c in zip(ids, rows)]))
        else:
            pd.DataFrame({"item_id": ids, "codes": rows}).to_parquet(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = read_import(path, catalog, unknown=unknown)
        except DataError as exc:
            event(f"refused: {str(exc).split(': ', 1)[-1][:30]}")
            return
        event("accepted")
        meant = {_meant_id(i): [int(c) for c in r] for i, r in zip(ids, rows)}
        assert len(meant) == len(ids) and all(_is_codes(meant[i]) for i in catalog)
        assert got == [meant[i] for i in catalog]
        if unknown == "error":
            assert set(meant) == set(catalog)

"""Bad input fails loudly (file, column, rows) and leaves earlier output untouched."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.cli import main
from components.config import load_params
from components.contract import read_json, read_table
from components.errors import ConfigError, DataError
from components.prepare import run_prepare
from conftest import ROOT

GOOD_ITEMS = "item_id,text\ni1,a red lamp\ni2,a blue chair\ni3,a green desk\n"
GOOD_QUERIES = "query_id,split,history,target\nq1,train,i1,i2\nq2,valid,i1 i2,i3\nq3,test,i2 i3,i1\n"


def _params(tmp_path: Path, items: str, queries: str, items_name: str = "items.csv",
            queries_name: str = "queries.csv") -> dict:
    (tmp_path / items_name).write_text(items)
    (tmp_path / queries_name).write_text(queries)
    return load_params(ROOT / "params.yaml", [
        "dataset=generic", f"out_dir={tmp_path / 'out'}",
        f"data.generic.items={tmp_path / items_name}", f"data.generic.queries={tmp_path / queries_name}"])


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture
def prepared_good(tmp_path):
    """A good prepare first: a failing run afterwards must leave these files as they were."""
    run_prepare(_params(tmp_path, GOOD_ITEMS, GOOD_QUERIES))
    return tmp_path, _snapshot(tmp_path / "out")


CASES = [
    # (items, queries, items file, queries file, file named, column, rows, message part)
    ("item_id,name\ni1,x\n", GOOD_QUERIES, "items.csv", "queries.csv", "items.csv", "text", None, "missing column"),
    ("item_id,text\ni1,a\ni2,b\ni1,c\n", GOOD_QUERIES, "items.csv", "queries.csv", "items.csv", "item_id", [2],
     "duplicate id 'i1'"),
    ("item_id,text\ni1,a\ni2,\ni3,c\n", GOOD_QUERIES, "items.csv", "queries.csv", "items.csv", "text", [1],
     "empty or null text"),
    ("item_id,text\ni1,a\ni2,   \ni3,c\n", GOOD_QUERIES, "items.csv", "queries.csv", "items.csv", "text", [1],
     "empty or null text"),
    (GOOD_ITEMS, GOOD_QUERIES.replace("q2,valid,i1 i2", "q2,valid,i1 i9"), "items.csv", "queries.csv",
     "queries.csv", "history", [1], "unknown item id 'i9'"),
    (GOOD_ITEMS, GOOD_QUERIES.replace("i3,i1", "i3,zz"), "items.csv", "queries.csv", "queries.csv", "targets", [2],
     "unknown item id 'zz'"),
    (GOOD_ITEMS, "", "items.csv", "queries.csv", "queries.csv", None, None, "empty file"),
    (GOOD_ITEMS, "query_id,split,history,target\n", "items.csv", "queries.csv", "queries.csv", None, None,
     "empty"),
    (GOOD_ITEMS, GOOD_QUERIES.replace("q3,test", "q3,testing"), "items.csv", "queries.csv", "queries.csv",
     "split", [2], "split must be one of"),
    (GOOD_ITEMS, GOOD_QUERIES.replace("q2,", "q1,"), "items.csv", "queries.csv", "queries.csv", "query_id", [1],
     "duplicate id"),
    ('{"item_id": "i1", "text": "a"}\n{"item_id": "i2", "text": "b"}\n{"item_id": "i3", "text": \n',
     GOOD_QUERIES, "items.jsonl", "queries.csv", "items.jsonl", None, [3], "malformed JSON on line 3"),
]


@pytest.mark.parametrize("items, queries, items_name, queries_name, file, column, rows, message", CASES)
def test_bad_input_names_the_place_and_keeps_old_output(prepared_good, items, queries, items_name, queries_name,
                                                       file, column, rows, message):
    tmp_path, before = prepared_good
    params = _params(tmp_path, items, queries, items_name, queries_name)
    with pytest.raises(DataError) as info:
        run_prepare(params)
    err = info.value
    assert Path(err.file).name == file and message in str(err)
    assert err.column == column
    if rows is not None:
        assert err.rows == rows and str(rows) in str(err)
    assert _snapshot(tmp_path / "out") == before


def test_failed_first_run_writes_nothing(tmp_path):
    params = _params(tmp_path, "item_id,text\ni1,a\ni1,b\n", GOOD_QUERIES)
    with pytest.raises(DataError):
        run_prepare(params)
    assert not (tmp_path / "out").exists()


def test_readers_reject_missing_unsupported_and_malformed(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_table(tmp_path / "nope.csv")
    (tmp_path / "x.xlsx").write_text("a")
    with pytest.raises(DataError, match=r"\.parquet, \.csv, \.jsonl"):
        read_table(tmp_path / "x.xlsx")
    (tmp_path / "bad.json").write_text('{\n  "0": {"title": "a"},\n  "1": {"title" "b"}\n}\n')
    with pytest.raises(DataError, match="line 3") as info:
        read_json(tmp_path / "bad.json")
    assert info.value.rows == [3]
    (tmp_path / "q.jsonl").write_text('{"query_id": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2 is not a JSON object"):
        read_table(tmp_path / "q.jsonl")


def test_query_without_text_or_history_and_unknown_dataset(tmp_path):
    params = _params(tmp_path, GOOD_ITEMS, "query_id,split,text,target\nq1,train,lamp,i1\nq2,test,,i2\n")
    with pytest.raises(DataError, match="neither text nor history") as info:
        run_prepare(params)
    assert info.value.rows == [1]
    params["dataset"] = "movies"
    with pytest.raises(ConfigError, match="valid names: amazon-scientific, climate-fever, generic"):
        run_prepare(params)
    assert not (tmp_path / "out").exists()


def test_cli_exits_2_with_message_on_stderr(tmp_path, capsys):
    params = _params(tmp_path, GOOD_ITEMS, GOOD_QUERIES.replace("i3,i1", "i3,zz"))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(dataset="generic", out_dir=str(tmp_path / "out"))
    raw["data"]["generic"] = dict(params["data"]["generic"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["stage", "prepare", "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "queries.csv" in err and "column 'targets'" in err and "'zz'" in err
    assert not (tmp_path / "out").exists()
    assert main(["stage", "prepare", "--params", str(tmp_path / "params.yaml"), "-s", "dataset=movies"]) == 2
    assert "'dataset': must be one of amazon-scientific | climate-fever | generic, got 'movies'" in capsys.readouterr().err

"""Bad input fails loudly (file, column, rows) and leaves earlier output untouched."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import ROOT

from components.data.prepare import run_prepare
from components.data.readers import read_json, read_table
from components.retrieval.retriever import load_retriever
from components.runtime.config import load_params
from components.runtime.errors import ConfigError, DataError
from components.tokenizers.sid_tokenizer import load_checkpoint
from sa2crq.cli import main

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
    # issue 14: values that used to crash or slip through
    ('{"item_id": "i1", "text": "a"}\n{"item_id": "i2", "text": []}\n{"item_id": "i3", "text": "c"}\n',
     GOOD_QUERIES, "items.jsonl", "queries.csv", "items.jsonl", "text", [1], "text must be a string, got list"),
    ('{"item_id": 1, "text": "a"}\n{"item_id": 2, "text": "b"}\n{"item_id": 7.5, "text": "c"}\n',
     GOOD_QUERIES, "items.jsonl", "queries.csv", "items.jsonl", "item_id", [2], "not the float 7.5"),
    ('{"item_id": "i1", "text": "a"}\n{"item_id": true, "text": "b"}\n', GOOD_QUERIES, "items.jsonl", "queries.csv",
     "items.jsonl", "item_id", [1], "not the boolean"),
    ('{"item_id": "i1", "text": "a", "brand": 1}\n{"item_id": "i2", "text": "b", "brand": "x"}\n'
     '{"item_id": "i3", "text": "c", "brand": 2}\n', GOOD_QUERIES, "items.jsonl", "queries.csv", "items.jsonl",
     "brand", [1], "mixed"),
    ("item_id,text,popularity\ni1,a,1\ni2,b,inf\ni3,c,2\n", GOOD_QUERIES, "items.csv", "queries.csv", "items.csv",
     "popularity", [1], "finite integer >= 0"),
    (GOOD_ITEMS, "query_id,split,order,history,target\nq1,train,1,i1,i2\nq2,valid,inf,i1 i2,i3\nq3,test,1e30,i2 i3,i1\n",
     "items.csv", "queries.csv", "queries.csv", "order", [1, 2], "order must be a finite integer"),
    (GOOD_ITEMS, "query_id,split,order,history,target\nq1,train,nan,i1,i2\nq2,valid,2,i1 i2,i3\nq3,test,3,i2 i3,i1\n",
     "items.csv", "queries.csv", "queries.csv", "order", [0], "order must be a finite integer"),
    (GOOD_ITEMS, GOOD_QUERIES.replace("q3,test", "q3,valid"), "items.csv", "queries.csv", "queries.csv", "split",
     None, "no 'test' queries"),
    (GOOD_ITEMS, "query_id,split,history,target\nq1,train,i1,i2\n", "items.csv", "queries.csv", "queries.csv",
     "split", None, "no 'valid' / 'test' queries"),
    (GOOD_ITEMS, '{"query_id": "q1", "split": "train", "text": "lamp", "targets": ["i1"]}\n'
     '{"query_id": "q2", "split": "valid", "text": 5, "targets": ["i2"]}\n', "items.csv", "queries.jsonl",
     "queries.jsonl", "text", [1], "text must be a string, got int"),
    (GOOD_ITEMS, '{"query_id": "q1", "split": "train", "text": "lamp", "targets": ["i1", 2.5]}\n', "items.csv",
     "queries.jsonl", "queries.jsonl", "targets", [0], "not the float 2.5"),
    (GOOD_ITEMS, '{"query_id": 1.5, "split": "train", "text": "lamp", "targets": ["i1"]}\n', "items.csv",
     "queries.jsonl", "queries.jsonl", "query_id", [0], "not the float 1.5"),
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


@pytest.mark.parametrize("name, data, column, rows", [
    ("items.csv", b"item_id,text\ni1,a red lamp\ni2,caf\xe9 chair\ni3,a desk\n", "text", [1]),
    ("items.jsonl", b'{"item_id": "i1", "text": "a"}\n{"item_id": "i2", "text": "b"}\n{"item_id": "i\xff3", "text": "c"}\n',
     "item_id", [2]),
    ("items.jsonl", b'{"item_id": "i1", "text": "a"}\n{"item_id": "i2", "text": "lone \\udc80 escape"}\n', "text", [1]),
])
def test_bytes_that_are_not_utf8_are_named_by_column_and_row(prepared_good, name, data, column, rows):
    tmp_path, before = prepared_good
    params = _params(tmp_path, GOOD_ITEMS, GOOD_QUERIES, items_name=name)
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match="not valid UTF-8") as info:
        run_prepare(params)
    assert Path(info.value.file).name == name and info.value.column == column and info.value.rows == rows
    assert _snapshot(tmp_path / "out") == before


def test_not_utf8_json_and_header_name_the_line_or_column(tmp_path):
    (tmp_path / "meta.json").write_bytes(b'{\n  "0": {"title": "a"},\n  "1": {"title": "\xe9"}\n}\n')
    with pytest.raises(DataError, match="line 3: not valid UTF-8") as info:
        read_json(tmp_path / "meta.json")
    assert info.value.rows == [3]
    (tmp_path / "h.csv").write_bytes(b"item_id,t\xe9xt\ni1,a\n")
    with pytest.raises(DataError, match="column name is not valid UTF-8"):
        read_table(tmp_path / "h.csv")


def test_directory_symlink_loop_and_broken_link_say_what_they_are(tmp_path):
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "loop.csv").symlink_to(tmp_path / "loop.csv")
    (tmp_path / "dangling.csv").symlink_to(tmp_path / "gone.csv")
    for name, text in (("folder.csv", "is a directory"), ("loop.csv", "symlink loop"),
                       ("dangling.csv", "broken symlink")):
        with pytest.raises(DataError, match=text) as info:
            read_table(tmp_path / name)
        assert Path(info.value.file).name == name and "not found" not in str(info.value)
    params = _params(tmp_path, GOOD_ITEMS, GOOD_QUERIES)
    params["data"]["generic"]["items"] = str(tmp_path / "folder.csv")
    with pytest.raises(DataError, match="folder.csv: is a directory"):
        run_prepare(params)


def test_float_ids_widened_by_a_null_blame_the_null_row_and_whole_floats_read_as_integers(tmp_path):
    pd.DataFrame({"item_id": [1.0, 2.0, float("nan")], "text": ["a", "b", "c"]}).to_parquet(tmp_path / "items.parquet")
    queries = "query_id,split,history,target\nq1,train,1,2\nq2,valid,1 2,1\nq3,test,2,1\n"
    params = _params(tmp_path, GOOD_ITEMS, queries)
    params["data"]["generic"]["items"] = str(tmp_path / "items.parquet")
    with pytest.raises(DataError, match="null or empty id") as info:
        run_prepare(params)
    assert info.value.column == "item_id" and info.value.rows == [2]
    pd.DataFrame({"item_id": [1.0, 2.0, 3.0], "text": ["a", "b", "c"]}).to_parquet(tmp_path / "items.parquet")
    run_prepare(params)
    items = pd.read_parquet(tmp_path / "out" / "prepared" / "items.parquet")
    assert items["item_id"].tolist() == ["1", "2", "3"] and items["popularity"].tolist() == [0, 1, 0]


def test_data_error_rows_are_plain_ints():
    err = DataError("f.json", "bad", column="item_id", rows=np.array([2753, 9], dtype=np.int64))
    assert err.rows == [2753, 9] and all(type(r) is int for r in err.rows)
    assert "rows [2753, 9]" in str(err) and "np.int64" not in str(err)


def _retriever_file(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "config": {"d_model": 4}}, path)
    return path


class _Evil:
    """A pickle that runs a shell command when unpickled without weights-only loading."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated or corrupt"), ("empty", "truncated or corrupt"), ("evil", "refused"),
    ("other", "not a checkpoint of this project"),
])
def test_damaged_or_evil_checkpoints_are_data_errors_naming_the_file(tmp_path, damage, message):
    path = _retriever_file(tmp_path / "model.pt")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "evil":
        path.write_bytes(pickle.dumps(_Evil(tmp_path / "pwned"), protocol=2))
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    for load in (load_retriever, load_checkpoint):
        if damage == "other" and load is load_checkpoint:
            continue  # a tokenizer checkpoint has no fixed keys
        with pytest.raises(DataError, match=message) as info:
            load(path)
        assert info.value.file == str(path)
    assert not (tmp_path / "pwned").exists()


def test_cli_prints_a_damaged_checkpoint_as_one_line(tmp_path, capsys):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(out_dir=str(tmp_path / "out"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "out" / "tokenizer").mkdir(parents=True)
    (tmp_path / "out" / "tokenizer" / "head.pt").write_bytes(b"")
    (tmp_path / "out" / "tokenizer" / "tail.pt").write_bytes(b"")
    assert main(["stage", "assign_ids", "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "head.pt" in err and "truncated or corrupt" in err and "Traceback" not in err


def test_new_items_whose_extra_column_cannot_join_the_catalog_are_refused_before_writing(tmp_path):
    from flows.catalog_update import read_new_items

    catalog = pd.DataFrame({"item_id": ["i1", "i2"], "text": ["a", "b"], "popularity": [1, 0],
                            "group": ["head", "cold"], "weight": [3, 4]})
    (tmp_path / "new.jsonl").write_text('{"item_id": "n1", "text": "c", "weight": 5}\n'
                                        '{"item_id": "n2", "text": "d", "weight": "heavy"}\n')
    with pytest.raises(DataError, match="mixed") as info:
        read_new_items(tmp_path / "new.jsonl", catalog)
    assert info.value.column == "weight" and info.value.rows == [1] and Path(info.value.file).name == "new.jsonl"
    (tmp_path / "new.jsonl").write_text('{"item_id": 9, "text": "c", "weight": 5}\n')
    assert read_new_items(tmp_path / "new.jsonl", catalog)["item_id"].tolist() == ["9"]

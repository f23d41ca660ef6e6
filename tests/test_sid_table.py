"""SID tables: import validation, stability check, determinism, statistics and outputs."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizer_fixtures import make_catalog, run_tokenizer, tiny_params

from components.runtime.errors import ConfigError, DataError
from components.tokenizers.sid_stats import sid_statistics
from components.tokenizers.sid_table import (
    assert_issued_reencode,
    assert_stable,
    changed_sids,
    issued_table,
    make_sid_table,
    read_import,
)

IDS = ["a", "b", "c"]


def _write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_import_accepts_json_mapping_json_records_and_parquet(tmp_path):
    want = [[1, 2], [3], [0, 4, 5]]
    mapping = _write_json(tmp_path / "m.json", dict(zip(IDS[::-1], want[::-1])))
    records = _write_json(tmp_path / "r.json", [{"item_id": i, "codes": c} for i, c in zip(IDS, want)])
    pq = tmp_path / "t.parquet"
    pd.DataFrame({"item_id": IDS, "codes": want}).to_parquet(pq)
    for path in (mapping, records, pq):
        assert read_import(path, IDS) == want


@pytest.mark.parametrize("obj, column, rows, text", [
    ({"a": [1], "b": [2], "zz": [3], "c": [4]}, "item_id", [2], "not in the catalog"),
    ({"a": [1], "b": [2]}, "item_id", [], "have no SID"),
    ({"a": [1], "b": [2.5], "c": [4]}, "codes", [1], "integers"),
    ({"a": [1], "b": ["x"], "c": []}, "codes", [1, 2], "integers"),
    ({"a": [-1], "b": [2], "c": [True]}, "codes", [0, 2], "non-negative"),
])
def test_import_validation_names_file_column_and_rows(tmp_path, obj, column, rows, text):
    path = _write_json(tmp_path / "sids.json", obj)
    with pytest.raises(DataError, match=text) as exc:
        read_import(path, IDS)
    assert exc.value.file == str(path) and exc.value.column == column and exc.value.rows == rows


def test_import_unknown_ids_error_with_plain_rows_or_drop_with_a_warning(tmp_path):
    obj = {"a": [1], "zz": [2], "b": [3], "yy": [4], "c": [5]}
    pq = tmp_path / "t.parquet"
    pd.DataFrame({"item_id": list(obj), "codes": list(obj.values())}).to_parquet(pq)
    with pytest.raises(DataError, match="2 item ids not in the catalog") as exc:
        read_import(pq, IDS)
    assert exc.value.rows == [1, 3] and all(type(r) is int for r in exc.value.rows)
    assert "rows [1, 3]" in str(exc.value) and "np.int64" not in str(exc.value)
    with pytest.warns(UserWarning, match="dropped 2 item ids not in the catalog"):
        assert read_import(pq, IDS, unknown="drop") == [[1], [3], [5]]
    bad = _write_json(tmp_path / "bad.json", {"a": [1], "zz": "not codes", "b": [3], "c": [2.5]})
    with pytest.warns(UserWarning), pytest.raises(DataError, match="integers") as exc:
        read_import(bad, IDS, unknown="drop")  # a dropped row's codes are not checked, the kept ones are
    assert exc.value.rows == [3]


@pytest.mark.parametrize("records, column, rows, text", [
    ([{"item_id": "a", "codes": [1]}, {"item_id": 2.5, "codes": [2]}], "item_id", [1], "not the float 2.5"),
    ([{"item_id": "a", "codes": [1]}, {"item_id": None, "codes": [2]}], "item_id", [1], "null item_id"),
    ([{"item_id": "a", "codes": [1]}, {"item_id": "b", "codes": [2 ** 63]}, {"item_id": "c", "codes": [3]}], "codes",
     [1], "int64"),
])
def test_import_refuses_float_or_null_ids_and_codes_beyond_int64(tmp_path, records, column, rows, text):
    path = _write_json(tmp_path / "r.json", records)
    with pytest.raises(DataError, match=text) as exc:
        read_import(path, IDS)
    assert exc.value.column == column and exc.value.rows == rows


def test_import_unknown_option_reaches_the_tokenizer_step(tmp_path):
    items, _ = make_catalog(tmp_path, n_head=5, n_tail=10, n_cold=1)
    codes = {i: [k % 3] for k, i in enumerate(items["item_id"])} | {"gone-1": [0], "gone-2": [1]}
    path = _write_json(tmp_path / "ext.json", codes)
    with pytest.raises(DataError, match="tokenizer.import_unknown: drop"):
        run_tokenizer(tiny_params(tmp_path, "import", f"tokenizer.import_path={path}"))
    with pytest.warns(UserWarning, match="dropped 2"):
        table = run_tokenizer(tiny_params(tmp_path, "import", f"tokenizer.import_path={path}",
                                          "tokenizer.import_unknown=drop"))
    assert table["item_id"].tolist() == items["item_id"].tolist()
    with pytest.raises(ConfigError, match="tokenizer.import_unknown"):
        run_tokenizer(tiny_params(tmp_path, "import", f"tokenizer.import_path={path}", "tokenizer.import_unknown=keep"))


def test_import_parquet_with_float_codes_is_rejected(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"item_id": IDS, "codes": [[1.0], [2.0], [3.5]]}).to_parquet(path)
    with pytest.raises(DataError) as exc:
        read_import(path, IDS)
    assert exc.value.column == "codes" and exc.value.rows == [0, 1, 2]


def test_import_method_writes_the_given_codes(tmp_path):
    items, _ = make_catalog(tmp_path, n_head=5, n_tail=10, n_cold=1)
    codes = {i: [k % 3, k % 5] if k % 4 else [k % 3] for k, i in enumerate(items["item_id"])}
    path = _write_json(tmp_path / "ext.json", codes)
    table = run_tokenizer(tiny_params(tmp_path, "import", f"tokenizer.import_path={path}"))
    assert table["codes"].tolist() == [codes[i] for i in items["item_id"]]
    assert set(table["stage"]) == {"import"}
    meta = json.loads((tmp_path / "sids" / "meta.json").read_text())
    assert meta["codebook_sizes"] == [3, 5] and meta["max_len"] == 2


def test_stability_check_flags_changed_and_lost_sids():
    old = make_sid_table(["a", "b", "c"], [[1, 2], [3], [4, 5]], "head", "v1")
    grown = make_sid_table(["a", "b", "c", "d"], [[1, 2], [3], [4, 5], [9]], ["head"] * 3 + ["new"], "v2")
    assert_stable(old, grown, "new.parquet")
    moved = make_sid_table(["a", "b", "d"], [[1, 2], [3, 0], [9]], "head", "v2")
    assert changed_sids(old, moved) == ["b", "c"]
    with pytest.raises(DataError) as exc:
        assert_stable(old, moved, "new.parquet")
    assert exc.value.column == "codes" and exc.value.rows == [1]
    # rows may refer to another order (the catalog's) than the compared table's
    with pytest.raises(DataError, match="2 head SIDs moved, e.g. \\['b', 'c'\\]") as exc:
        assert_stable(old, moved, "sids.parquet", row_ids=["z", "c", "a", "b"], what="head SIDs moved")
    assert exc.value.rows == [1, 3]


def test_reencode_check_names_issued_items_the_catalog_lost():
    issued = {"item_ids": ["a", "b", "c"], "codes": torch.tensor([[0, 1], [1, 2], [2, 3]]),
              "lengths": torch.tensor([2, 1, 2])}
    assert issued_table(issued, "v")["codes"].tolist() == [[0, 1], [1], [2, 3]]
    with pytest.raises(DataError, match="1 issued head items are not in the catalog.*\\['b'\\]") as exc:
        assert_issued_reencode(SimpleNamespace(version="v"), issued, ["a", "c", "d"], np.zeros((3, 2)), True,
                               "sids.parquet")
    assert exc.value.column == "item_id" and exc.value.file == "sids.parquet"


def test_same_seed_gives_identical_sid_table(tmp_path):
    runs = []
    for name in ("one", "two"):
        out = tmp_path / name
        make_catalog(out)
        runs.append(run_tokenizer(tiny_params(out, "sa2crq")))
    pd.testing.assert_frame_equal(runs[0], runs[1])
    out = tmp_path / "seed1"
    make_catalog(out)
    other = run_tokenizer(tiny_params(out, "sa2crq", "seed=1"))
    assert other["codes"].tolist() != runs[0]["codes"].tolist()


def test_assign_ids_outputs_follow_the_contract(tmp_path):
    items, _ = make_catalog(tmp_path)
    table = run_tokenizer(tiny_params(tmp_path, "acrq"))
    assert table["item_id"].tolist() == items["item_id"].tolist()
    assert list(table.columns) == ["item_id", "codes", "length", "stage", "version"]
    meta = json.loads((tmp_path / "sids" / "meta.json").read_text())
    assert meta["codebook_sizes"] == [6, 12, 12] and meta["anchor_sizes"] == [4, 8, 8]
    assert meta["tau"] is None and meta["max_len"] == 3 and meta["method"] == "acrq"
    assert set(table["length"]) == {3}
    stats = json.loads((tmp_path / "metrics" / "sid_stats.json").read_text())
    assert set(stats["recon_err"]) == {"all", "head", "tail", "cold"}
    for png in ("sid_lengths.png", "items_per_sid.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"


def test_sid_statistics_on_a_hand_made_table():
    items = pd.DataFrame({"item_id": list("abcdef"), "group": ["head", "head", "tail", "tail", "tail", "cold"]})
    table = make_sid_table(list("abcdef"), [[0, 1], [0, 2], [1], [1], [1], [0, 1]], "full", "v")
    meta = {"method": "x", "codebook_sizes": [2, 4], "anchor_sizes": [2, 3], "tau": 1.0}
    s = sid_statistics(table, items, meta, recon_err=np.array([1.0, 3.0, 2.0, 2.0, 2.0, 5.0]))
    assert s["n_sids"] == 3 and s["items_per_sid"]["mean"] == pytest.approx(2.0) and s["items_per_sid"]["max"] == 3
    assert s["unique_share"] == pytest.approx(1 / 6)
    assert s["length"]["head"]["mean"] == 2.0 and s["length"]["tail"]["hist"] == {"1": 3}
    assert s["layers"][0]["dead"] == 0
    assert s["layers"][1] == {"layer": 2, "size": 4, "anchor_size": 3, "items_reaching": 3, "used": 2,
                              "dead": 2, "dead_share": 0.5, "extension_used": 0}
    assert s["recon_err"]["head"] == 2.0 and s["recon_err"]["cold"] == 5.0

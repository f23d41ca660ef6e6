"""SID tables: build, save / load, import an external table, and check issued SIDs are stable.

File contract (docs/ARCHITECTURE.md): `item_id` (str), `codes` (list[int]), `length` (int),
`stage` (head | tail | new | import | full), `version` (str); one row per item.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from components.data.contract import id_column
from components.data.readers import check_file, read_text
from components.data.values import INT64_MAX
from components.runtime.atomic import write_parquet
from components.runtime.errors import DataError
from components.runtime.safe_load import read_frame

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


def sid_version(method: str, table: pd.DataFrame, meta: dict, tokenizer_files: Sequence[str | os.PathLike] = ()
                ) -> str:
    """The SID version, `<method>-<12 hex>`: a hash of everything that decides or reads an SID.

    That is every item's codes (in table order), the vocabulary in meta (codebook sizes, lengths,
    tau, collision token; not meta's own `version`) and the bytes of the tokenizer files that
    assigned them (and will assign new items' SIDs at retrain). A params hash missed changes that
    do not go through params: `stage train_tail -s tokenizer.epochs_tail=3` gave 50 items new
    SIDs under the old version, and a retriever trained on the old SIDs passed every check. The
    retriever records the version it was trained on (its config `sid_version`); evaluation and
    serving refuse a SID table of another version."""
    h = hashlib.sha256(json.dumps({"method": method, "meta": {k: v for k, v in meta.items() if k != "version"}},
                                  sort_keys=True, default=str).encode())
    for item, codes in zip(table["item_id"], table["codes"]):
        h.update(json.dumps([str(item), [int(c) for c in codes]]).encode() + b"\n")
    for path in tokenizer_files:
        h.update(Path(path).name.encode() + b"\0" + hashlib.sha256(Path(path).read_bytes()).digest())
    return f"{method}-{h.hexdigest()[:12]}"


def write_sid_table(df: pd.DataFrame, path: str | os.PathLike) -> None:
    validate_sid_table(df, str(path))
    write_parquet(df[list(SID_COLUMNS)], path)


def read_sid_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read and check a sids/sid_table.parquet; codes come back as lists of int."""
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "SID table not found (run assign_ids first)")
    df = read_frame(path, rerun="assign_ids")
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

# The largest imported code: each code is a row of the retriever's vocabulary (a layer holds max code + 1
# rows), so a code of 1e12 would ask train_retriever for terabytes. The same bound as
# tokenizer.codebook_sizes in components/runtime/config_schema.py (65536 codes per layer).
MAX_IMPORT_CODE = 65535


def _read_import_file(path: Path) -> pd.DataFrame:
    """JSON ({item_id: [codes]} or [{item_id, codes}, ...]) or parquet (item_id, codes)."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".parquet"):
        raise DataError(str(path), "import file must be .json or .parquet")
    check_file(path, "import file not found (tokenizer.import_path)")
    if suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataError(str(path), f"not a readable parquet file: {exc}") from None
    else:
        try:
            obj = json.loads(read_text(path))
        except json.JSONDecodeError as exc:
            raise DataError(str(path), f"malformed JSON at line {exc.lineno}: {exc.msg}") from None
        if isinstance(obj, dict):
            df = pd.DataFrame({"item_id": pd.Series(list(obj.keys()), dtype=object),
                               "codes": pd.Series(list(obj.values()), dtype=object)})
        elif isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
            df = pd.DataFrame({c: pd.Series([r.get(c) for r in obj], dtype=object) for c in ("item_id", "codes")
                               if any(c in r for r in obj)})
        else:
            raise DataError(str(path), "JSON must be an object {item_id: [codes]} or a list of {item_id, codes}")
    for col in ("item_id", "codes"):
        if col not in df.columns:
            raise DataError(str(path), f"missing column (file has: {', '.join(map(str, df.columns))})", column=col)
    return df


def _is_code_list(value: object) -> bool:
    """A non-empty list of integers in [0, 2^63) (no booleans, no floats)."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        return False
    if len(value) == 0 or any(isinstance(v, (bool, np.bool_)) for v in value):
        return False
    arr = np.asarray(value, dtype=object)
    return arr.ndim == 1 and all(isinstance(v, (int, np.integer)) and 0 <= v <= INT64_MAX for v in arr)


def read_import(path: str | os.PathLike, catalog_ids: Sequence[str], unknown: str = "error") -> list[list[int]]:
    """Codes for every catalog item, in catalog order, from an external SID table.

    DataError (file, column, first rows) for null, float or duplicate item ids, catalog items
    the file misses, and codes that are not non-empty lists of non-negative integers. Item
    ids not in the catalog are an error, or with `unknown="drop"` (tokenizer.import_unknown)
    left out with a warning saying how many."""
    path = Path(path)
    file = str(path)
    df = _read_import_file(path)
    ids = id_column(df["item_id"], file, "item_id")
    null = ids.isna().to_numpy()
    if null.any():
        raise DataError(file, "null item_id", column="item_id", rows=np.flatnonzero(null))
    dup = ids.duplicated().to_numpy()
    if dup.any():
        raise DataError(file, f"duplicate item_id {ids[dup].iloc[0]!r}", column="item_id", rows=np.flatnonzero(dup))
    outside = (~ids.isin(set(map(str, catalog_ids)))).to_numpy()
    if outside.any() and unknown == "error":
        raise DataError(file, f"{int(outside.sum())} item ids not in the catalog, e.g. {ids[outside].head(5).tolist()} "
                              "(tokenizer.import_unknown: drop leaves them out)", column="item_id",
                        rows=np.flatnonzero(outside))
    if outside.any():
        warnings.warn(f"{file}: dropped {int(outside.sum())} item ids not in the catalog "
                      f"(tokenizer.import_unknown: drop), e.g. {ids[outside].head(5).tolist()}")
    bad = ~df["codes"].map(_is_code_list).to_numpy(dtype=bool) & ~outside
    if bad.any():
        raise DataError(file, "codes must be non-empty lists of non-negative integers (int64)",
                        column="codes", rows=np.flatnonzero(bad))
    # rows left out (ids outside the catalog) may hold anything: only the kept, checked lists are read
    too_big = np.array([not out and max(c) > MAX_IMPORT_CODE for c, out in zip(df["codes"], outside)], dtype=bool)
    if too_big.any():
        raise DataError(file, f"codes must be at most {MAX_IMPORT_CODE} (each is a row of the retriever's "
                              "vocabulary; renumber them per layer from 0)", column="codes",
                        rows=np.flatnonzero(too_big))
    by_id = dict(zip(ids[~outside], df["codes"][~outside]))
    missing = [i for i in map(str, catalog_ids) if i not in by_id]
    if missing:
        raise DataError(file, f"{len(missing)} catalog items have no SID, e.g. {missing[:5]}", column="item_id")
    return [[int(c) for c in by_id[i]] for i in map(str, catalog_ids)]


# ---- stability ---------------------------------------------------------------------------

def changed_sids(old: pd.DataFrame, new: pd.DataFrame) -> list[str]:
    """Item ids of `old` whose SID differs in `new` or that `new` lost."""
    new_codes = dict(zip(new["item_id"].astype(str), new["codes"].map(lambda c: tuple(int(x) for x in c))))
    return [i for i, c in zip(old["item_id"].astype(str), old["codes"])
            if new_codes.get(i) != tuple(int(x) for x in c)]


def assert_stable(old: pd.DataFrame, new: pd.DataFrame, file: str, row_ids: Sequence[str] | None = None,
                  what: str = "issued SIDs changed or vanished") -> None:
    """DataError naming the items whose issued SID changed (an issued SID never changes
    unless a full rebuild is asked for). The error's rows are positions in `row_ids`
    (default: `new`'s item ids)."""
    changed = changed_sids(old, new)
    if changed:
        ids = pd.Series(list(new["item_id"] if row_ids is None else row_ids), dtype=object).astype(str)
        pos = np.flatnonzero(ids.isin(set(changed))).tolist()
        raise DataError(file, f"{len(changed)} {what}, e.g. {changed[:5]}", column="codes", rows=pos)


def issued_table(issued: dict, version: str) -> pd.DataFrame:
    """The Stage-1 registry (head.pt `issued`: item ids, full-depth codes, lengths) as a SID table."""
    codes = np.asarray(issued["codes"])
    lengths = np.asarray(issued["lengths"])
    return make_sid_table(issued["item_ids"], [c[:n].tolist() for c, n in zip(codes, lengths)], "head", version)


def anchor_tokenizer(tokenizer):
    """`tokenizer` restricted to its anchor rows (the Stage-1 codebooks it carries): same
    encoder, path table, tau and lengths, extension rows dropped."""
    from components.tokenizers.quantizer import (
        ResidualQuantizer,  # lazy: keeps this module free of faiss / torch imports
    )

    q = tokenizer.quantizer
    anchors = ResidualQuantizer([0] * q.n_layers, q.dim, anchors=[q.anchor(layer) for layer in range(q.n_layers)])
    return dataclasses.replace(tokenizer, quantizer=anchors)


def reencoded_issued(tokenizer, issued: dict, item_ids: Sequence[str], x: np.ndarray, unique_head: bool,
                     version: str) -> pd.DataFrame:
    """The issued items, in registry order, encoded again from their catalog embeddings by
    the anchor rows of `tokenizer` (what Stage 1 issued them from), lengthened by
    `unique_floor` over the whole registry when `tokenizer.sarq.unique_head` made Stage 1
    do so. Items the catalog lost are left out (changed_sids reports them as vanished), and
    then so is the lengthening, which needs the whole registry."""
    from components.tokenizers.sarq import unique_floor

    pos = {str(i): k for k, i in enumerate(item_ids)}
    ids = [str(i) for i in issued["item_ids"] if str(i) in pos]
    if not ids:
        return make_sid_table([], [], "head", version)
    codes, lengths = anchor_tokenizer(tokenizer).assign(np.asarray(x)[[pos[i] for i in ids]])
    if unique_head and len(ids) == len(issued["item_ids"]):
        lengths = unique_floor(codes, lengths, tokenizer.max_len)
    return make_sid_table(ids, [c[:n].tolist() for c, n in zip(codes, lengths)], "head", version)


def assert_issued_reencode(tokenizer, issued: dict, item_ids: Sequence[str], x: np.ndarray, unique_head: bool,
                           file: str) -> None:
    """Stage 2 must leave every issued head SID reproducible: the Stage-2 tokenizer's anchor
    rows, frozen encoder and frozen path table give each head item exactly the SID Stage 1
    issued (head.pt `issued`). DataError naming the items (rows: their positions in
    `item_ids`) when they do not: anchors, encoder, table or embeddings changed since
    train_head, or the registry was edited; DataError naming them when the catalog lost
    issued items.

    Only the anchor rows are used: the extension rows are new in Stage 2 and may lie nearer
    to some head items (238 of 725 on amazon-scientific); those items keep their issued SID,
    as the registry is the source of truth for head SIDs (docs/TOKENIZERS.md)."""
    catalog = {str(i) for i in item_ids}
    lost = [str(i) for i in issued["item_ids"] if str(i) not in catalog]
    if lost:  # before re-encoding: unique_floor over a partial registry would blame other items too
        raise DataError(file, f"{len(lost)} issued head items are not in the catalog any more, e.g. {lost[:5]} "
                              "(the catalog changed since train_head: run train_head and train_tail again)",
                        column="item_id")
    old = issued_table(issued, tokenizer.version)
    new = reencoded_issued(tokenizer, issued, item_ids, x, unique_head, tokenizer.version)
    assert_stable(old, new, file, row_ids=item_ids,
                  what="issued head SIDs are not what the Stage-2 tokenizer's anchor rows give them "
                       "(anchors, encoder, path table or embeddings changed since train_head, or the registry "
                       "was edited: run train_head and train_tail again)")


# ---- TIGER collision token ----------------------------------------------------------------

COLLISION_MULTIPLE = 8


def collision_codes(prefixes: Sequence[Sequence[int]], popularity: Sequence[float] | np.ndarray) -> list[int]:
    """TIGER's last token: the items sharing a prefix get 0..n-1, an item alone in it gets 0.

    Within a prefix the order is popularity descending, then row (items.parquet order):
    code 0, the most frequent code of the layer, goes to the most popular item, so the
    decoder's prior inside a colliding group follows the popularity order the retriever
    used for shared SIDs without the token; the row breaks ties deterministically."""
    pop = np.asarray(popularity, dtype=np.float64)
    if len(pop) != len(prefixes):
        raise ValueError(f"{len(prefixes)} prefixes but {len(pop)} popularity values")
    out = np.zeros(len(pop), dtype=np.int64)
    taken: dict[tuple[int, ...], int] = {}
    for row in np.lexsort((np.arange(len(pop)), -pop)):
        key = tuple(int(c) for c in prefixes[row])
        out[row] = taken.get(key, 0)
        taken[key] = int(out[row]) + 1
    return out.tolist()


def next_collision_codes(issued: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]]) -> list[int]:
    """Collision codes for new items (in input order) next to the issued full SIDs (prefix +
    collision code): the next free number per prefix, so no new SID equals an issued one and
    no issued SID changes."""
    taken: dict[tuple[int, ...], int] = {}
    for sid in issued:
        key = tuple(int(c) for c in sid[:-1])
        taken[key] = max(taken.get(key, 0), int(sid[-1]) + 1)
    out = []
    for prefix in prefixes:
        key = tuple(int(c) for c in prefix)
        out.append(taken.get(key, 0))
        taken[key] = out[-1] + 1
    return out


def collision_layer_size(codes: Sequence[int], multiple: int = COLLISION_MULTIPLE) -> int:
    """Rows of the collision layer: the largest code + 1 (the largest collision group)
    rounded up to `multiple`, at least 1, so a few new items per prefix fit before the
    retriever's vocabulary has to grow."""
    need = int(max(codes, default=-1)) + 1
    return max(1, -(-need // multiple) * multiple)


def live_version(out_dir: str | os.PathLike) -> str:
    """The version of the SIDs in place (sids/meta.json `version`)."""
    meta = Path(out_dir) / "sids" / "meta.json"
    if not meta.exists():
        raise FileNotFoundError(f"{meta}: no live SID table (run the pipeline first)")
    return str(json.loads(meta.read_text())["version"])

"""New items into a candidate version: read and check them, then write the grown catalog.

The candidate folder (versions/<new>/) gets the full set a retriever serves from:
prepared/ (old items, then the new ones as cold items; queries unchanged), embeddings/
(old rows, then the new rows), tokenizer/ (with any grown extension rows), sids/ (old rows
byte-for-byte the same SIDs, new rows with stage `new`). The written table is read back
and its old rows checked unchanged (components.tokenizers.sid_table.assert_stable) before the folder
is moved into place. With TIGER's collision
token (meta `collision_token`) new SIDs get the next free collision code of their prefix.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from components.data.contract import ITEM_COLUMNS, check_writable, read_items
from components.runtime.atomic import atomic_dir
from components.runtime.errors import DataError
from components.runtime.safe_load import load_matrix, read_frame
from components.tokenizers.sid_table import (
    assert_stable,
    collision_layer_size,
    make_sid_table,
    next_collision_codes,
    read_sid_table,
    write_sid_table,
)
from components.tokenizers.sid_tokenizer import Tokenizer, load_checkpoint, save_checkpoint


def read_new_items(path: str | Path, catalog: pd.DataFrame) -> pd.DataFrame:
    """New items in the data contract's item format (item_id, text); none may be in the catalog,
    and their extra columns must join the catalog's in one parquet column type (checked here,
    before the candidate is written)."""
    file = str(path)
    df = read_items(path)
    known = df["item_id"].isin(set(catalog["item_id"].astype(str)))
    if known.any():
        raise DataError(file, f"{int(known.sum())} items are already in the catalog, e.g. "
                        f"{df.loc[known, 'item_id'].head(3).tolist()} (retraining adds new items only)",
                        column="item_id", rows=np.flatnonzero(known).tolist())
    check_writable(grown_items(catalog, df), file, rows_from=len(catalog))
    return df


def grown_items(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Old items, then the new ones as cold items (popularity 0): the candidate's items.parquet."""
    rows = pd.DataFrame({"item_id": new["item_id"], "text": new["text"],
                         "popularity": np.zeros(len(new), dtype=old["popularity"].dtype), "group": "cold"})
    extra = [c for c in old.columns if c not in ITEM_COLUMNS and c in new.columns]
    for col in extra:
        rows[col] = new[col].to_numpy()
    return pd.concat([old, rows], ignore_index=True)[list(old.columns)]


def _save_tokenizer(base_tok: Path, cand_tok: Path, tokenizer: Tokenizer) -> None:
    """Copy tokenizer/; the checkpoint that holds the serving tokenizer gets the grown state."""
    with atomic_dir(cand_tok) as tmp:
        for f in base_tok.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        for name in ("tail.pt", "head.pt"):
            if (tmp / name).exists():
                ckpt = load_checkpoint(tmp / name)
                if ckpt.get("tokenizer") is not None:
                    ckpt["tokenizer"] = tokenizer.state()
                    save_checkpoint(ckpt, tmp / name)
                    return


def with_collision_codes(old_table: pd.DataFrame, meta: dict,
                         codes: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """New SIDs plus the collision layer's size (an empty list when meta has no collision token).

    Each new item gets the next free collision code of its prefix, so it collides with no
    issued SID. A prefix that outgrows the layer grows it (to the next multiple of 8) rather
    than failing, like grown extension rows: the retriever's fine-tuning maps the old tokens
    onto the grown vocabulary."""
    if not meta.get("collision_token"):
        return codes, []
    extra = next_collision_codes(list(old_table["codes"]), codes)
    size = max(int(meta["codebook_sizes"][-1]), collision_layer_size(extra))
    return [[*c, k] for c, k in zip(codes, extra)], [size]


def write_candidate(base: Path, cand: Path, new_items: pd.DataFrame, new_emb: np.ndarray,
                    codes: list[list[int]], tokenizer: Tokenizer, version: str) -> dict:
    """Write prepared/, embeddings/, tokenizer/, sids/ of the candidate; returns SID counts."""
    old_items = read_frame(base / "prepared" / "items.parquet")
    old_table = read_sid_table(base / "sids" / "sid_table.parquet")
    meta = json.loads((base / "sids" / "meta.json").read_text())
    codes, collision_size = with_collision_codes(old_table, meta, codes)
    table = pd.concat([old_table, make_sid_table(new_items["item_id"], codes, "new", version)], ignore_index=True)
    items = grown_items(old_items, new_items)
    with atomic_dir(cand / "prepared") as tmp:
        items.to_parquet(tmp / "items.parquet", index=False)
        shutil.copy2(base / "prepared" / "queries.parquet", tmp / "queries.parquet")
    with atomic_dir(cand / "embeddings") as tmp:
        np.save(tmp / "items.npy", np.concatenate([load_matrix(base / "embeddings" / "items.npy"), new_emb]).astype(np.float32))
        if (base / "embeddings" / "queries.npy").exists():
            shutil.copy2(base / "embeddings" / "queries.npy", tmp / "queries.npy")
    _save_tokenizer(base / "tokenizer", cand / "tokenizer", tokenizer)
    meta.update({"version": version, "codebook_sizes": [int(k) for k in tokenizer.sizes] + collision_size,
                 "parent": meta["version"]})
    with atomic_dir(cand / "sids") as tmp:
        write_sid_table(table, tmp / "sid_table.parquet")
        # what the candidate will serve, read back: a write that drops, reorders or coerces issued codes fails here
        assert_stable(old_table, read_sid_table(tmp / "sid_table.parquet"), str(cand / "sids" / "sid_table.parquet"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    lengths = np.array([len(c) for c in codes])
    new_sids = {tuple(c) for c in codes}
    old_sids = {tuple(c) for c in old_table["codes"]}
    return {"n_old_items": int(len(old_table)), "n_new_items": int(len(codes)),
            "new_mean_length": float(lengths.mean()) if len(lengths) else 0.0,
            "new_items_on_new_sids": int(sum(tuple(c) not in old_sids for c in codes)),
            "n_new_sids": int(len(new_sids - old_sids)), "codebook_sizes": meta["codebook_sizes"]}

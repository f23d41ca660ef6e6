"""tokenizer.method: import: SIDs from a file (tokenizer.import_path, JSON or parquet; read and checked
by sid_table.read_import at train_head), kept as given: the hooks of its registration (builtin.py)."""
from __future__ import annotations

from components.runtime.errors import ConfigError, DataError
from components.tokenizers.sid_table import make_sid_table, read_import
from components.tokenizers.tokenizer_stages import Assigned, AssignRun, HeadRun, TokenizerConfig


def train_head(run: HeadRun) -> None:
    """Read and check the file; head.pt keeps every catalog item's codes (no tokenizer)."""
    item_ids = run.items["item_id"].astype(str).tolist()
    codes = read_import(run.cfg.import_path, item_ids, run.cfg.import_unknown)
    run.ckpt["import"] = {"file": run.cfg.import_path, "item_ids": item_ids, "codes": codes}
    run.summary["n_items"] = len(codes)


def assign_ids(run: AssignRun) -> Assigned:
    """The imported codes of every catalog item; the vocabulary sizes are the largest codes + 1."""
    imported = dict(zip(run.head["import"]["item_ids"], run.head["import"]["codes"]))
    missing = [i for i in run.item_ids if i not in imported]
    if missing:
        raise DataError(run.cfg.import_path, f"{len(missing)} catalog items have no SID, e.g. {missing[:5]} "
                                             "(the catalog changed since train_head)", column="item_id")
    codes_list = [imported[i] for i in run.item_ids]
    table = make_sid_table(run.item_ids, codes_list, "import", run.head["version"])
    sizes = [int(max((c[l] for c in codes_list if len(c) > l), default=-1)) + 1
             for l in range(max(map(len, codes_list)))]
    meta = {"method": "import", "codebook_sizes": sizes, "anchor_sizes": sizes,
            "max_len": len(sizes), "min_len": int(min(map(len, codes_list))), "tau": None,
            "collision_token": False}
    return Assigned(table, meta)


def check(cfg: TokenizerConfig) -> None:
    if not cfg.import_path:
        raise ConfigError("tokenizer.import_path", "tokenizer.method=import needs a JSON or parquet file")


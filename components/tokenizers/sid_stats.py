"""SID statistics (lengths per group, items per SID, uniqueness, codebook usage) and plots."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from components.runtime.atomic import atomic_path
from components.tokenizers.sid_table import sid_strings

GROUPS = ("head", "tail", "cold")
QUANTILES = {"q80": 0.8, "q90": 0.9, "q99": 0.99, "q999": 0.999}


def _group_of(sid_table: pd.DataFrame, items_df: pd.DataFrame) -> pd.Series:
    groups = dict(zip(items_df["item_id"].astype(str), items_df["group"].astype(str)))
    return sid_table["item_id"].astype(str).map(groups).fillna("new")


def _length_summary(lengths: np.ndarray) -> dict:
    if len(lengths) == 0:
        return {"n": 0, "mean": None, "hist": {}}
    values, counts = np.unique(lengths, return_counts=True)
    return {"n": int(len(lengths)), "mean": float(lengths.mean()),
            "hist": {str(int(v)): int(c) for v, c in zip(values, counts)}}


def _collision_summary(sid_table: pd.DataFrame) -> dict:
    """With TIGER's collision token the SIDs are unique by construction; the figures of the
    SIDs without it (the prefix before the last code) still say how crowded the codebooks are."""
    prefixes = sid_table["codes"].map(lambda c: "-".join(str(int(x)) for x in c[:-1]))
    counts = prefixes.value_counts()
    last = np.array([int(c[-1]) for c in sid_table["codes"]], dtype=np.int64)
    return {"prefix_unique_share": float((prefixes.map(counts) == 1).mean()) if len(prefixes) else 0.0,
            "prefix_n_sids": int(len(counts)),
            "prefix_items_per_sid_mean": float(counts.mean()) if len(counts) else 0.0,
            "max_code": int(last.max()) if len(last) else -1}


def sid_statistics(sid_table: pd.DataFrame, items_df: pd.DataFrame, meta: dict,
                   recon_err: np.ndarray | None = None) -> dict:
    """The SID figures the paper reports, per head / tail / cold where it matters.

    items_per_sid quantiles run over distinct SIDs (how many items one SID holds);
    unique_share is the share of items whose SID no other item has; a code is dead at a
    layer when no item's SID uses it there. recon_err, when given, is aligned with the
    rows of sid_table. With meta `collision_token` the last layer is TIGER's collision token
    and `collision` reports the SIDs before it."""
    sids = sid_strings(sid_table)
    per_sid = sids.value_counts().to_numpy()
    holders = sids.map(sids.value_counts())
    group = _group_of(sid_table, items_df)
    lengths = sid_table["length"].to_numpy()
    stats: dict = {
        "method": meta.get("method"), "tau": meta.get("tau"),
        "n_items": int(len(sid_table)), "n_sids": int(len(per_sid)),
        "unique_share": float((holders == 1).mean()) if len(sids) else 0.0,
        "items_per_sid": {"mean": float(per_sid.mean()) if len(per_sid) else 0.0,
                          **{k: float(np.quantile(per_sid, q)) for k, q in QUANTILES.items()},
                          "max": int(per_sid.max()) if len(per_sid) else 0},
        "length": {"all": _length_summary(lengths)},
        "unique_share_by_group": {},
        "layers": [],
    }
    for g in GROUPS:
        sel = (group == g).to_numpy()
        stats["length"][g] = _length_summary(lengths[sel])
        stats["unique_share_by_group"][g] = float((holders[sel] == 1).mean()) if sel.any() else None
    sizes = meta.get("codebook_sizes") or []
    anchors = meta.get("anchor_sizes") or sizes
    for layer, size in enumerate(sizes):
        used_codes = np.array([c[layer] for c in sid_table["codes"] if len(c) > layer], dtype=np.int64)
        used = np.unique(used_codes)
        n_anchor = int(anchors[layer]) if layer < len(anchors) else int(size)
        stats["layers"].append({
            "layer": layer + 1, "size": int(size), "anchor_size": n_anchor,
            "items_reaching": int(len(used_codes)), "used": int(len(used)),
            "dead": int(size - len(used)), "dead_share": float(1 - len(used) / size) if size else 0.0,
            "extension_used": int((used >= n_anchor).sum()),
        })
    if meta.get("collision_token"):
        stats["collision"] = _collision_summary(sid_table)
    if recon_err is not None:
        err = np.asarray(recon_err, dtype=np.float64)
        stats["recon_err"] = {"all": float(err.mean())}
        for g in GROUPS:
            sel = (group == g).to_numpy()
            stats["recon_err"][g] = float(err[sel].mean()) if sel.any() else None
    return stats


def plot_sid_stats(sid_table: pd.DataFrame, items_df: pd.DataFrame, lengths_png: str | os.PathLike,
                   items_per_sid_png: str | os.PathLike) -> None:
    """Two PNGs: SID length shares per group, and the distribution of items per SID."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group = _group_of(sid_table, items_df)
    lengths = sid_table["length"].to_numpy()
    max_len = int(lengths.max()) if len(lengths) else 1
    xs = np.arange(1, max_len + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(GROUPS)
    for k, g in enumerate(GROUPS):
        sel = lengths[(group == g).to_numpy()]
        if len(sel):
            shares = [(sel == x).mean() for x in xs]
            ax.bar(xs + (k - 1) * width, shares, width=width, label=f"{g} (n={len(sel)}, mean {sel.mean():.2f})")
    ax.set_xlabel("SID length")
    ax.set_ylabel("share of the group's items")
    ax.set_xticks(xs)
    ax.set_title("SID length by item group")
    ax.legend()
    fig.tight_layout()
    with atomic_path(lengths_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

    per_sid = sid_strings(sid_table).value_counts().to_numpy()
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(per_sid):
        values, counts = np.unique(per_sid, return_counts=True)
        ax.bar(values, counts, width=0.9)
        ax.set_yscale("log")
    ax.set_xlabel("items per SID")
    ax.set_ylabel("number of SIDs (log)")
    ax.set_title(f"items per SID: mean {per_sid.mean() if len(per_sid) else 0:.2f}, max {per_sid.max() if len(per_sid) else 0}")
    fig.tight_layout()
    with atomic_path(items_per_sid_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

"""Recall@K against K, one line per row of a comparison: how each method fares at every depth a user
may read (a ranker's top 10 or a candidate generator's top 500), in one picture beside the results file."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from components.evaluation.report import plt, save_figure
from components.evaluation.results_file import ROW_NAMES

# rows drawn when present (the others stay in the tables): ours, the paper's, the strongest baselines
MAIN_ROWS = ("SA2CRQ", "SA2CRQ (paper retriever)", "TIGER", "fusion without generation", "SASRec + text",
             "SASRec + text + fusion", "SASRec", "BM25", "dense", "two-tower")


def recall_at_k_figure(table: pd.DataFrame, path: Path, budgets: list[int]) -> list[str]:
    """Mean test Recall@K over seeds (overall) for every K the table holds, log K axis, the budgets marked;
    `table` is the comparison's (method, group) table with `recall@K` columns. Returns the rows drawn (named
    as in the results file); a row without values (skipped) is not drawn."""
    overall = table.xs("overall", level="group")
    ks = sorted(int(c.split("@")[1]) for c in overall.columns if c.startswith("recall@") and c[7:].isdigit())
    overall = overall[overall[[f"recall@{k}" for k in ks]].notna().any(axis=1)]
    shown = {ROW_NAMES.get(m, m): m for m in overall.index}
    rows = [m for m in MAIN_ROWS if m in shown] or list(shown)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name in rows:
        ax.plot(ks, [overall.loc[shown[name], f"recall@{k}"] for k in ks], marker="o", markersize=3, label=name)
    for k in budgets:
        ax.axvline(k, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("K (items read per query, log scale)")
    ax.set_ylabel("test Recall@K (mean over seeds)")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return rows

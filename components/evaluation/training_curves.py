"""Per-epoch validation curves of the comparison's retrievers, gathered into one table and plot.

Each (variant, seed) run writes plots/retriever_curve.csv; the comparison stacks them
(curves.csv) and draws validation Recall@10 against epoch, one line per variant and seed
(curves.png), so where each retriever peaks and how early stopping cut it is one picture.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from components.evaluation.report import plt, save_figure
from components.runtime.atomic import atomic_path


def gather_curves(runs: list[tuple[str, int, Path]]) -> pd.DataFrame:
    """(variant name, seed, run folder) -> one long frame: variant, seed, epoch, train_loss, val_recall@10."""
    parts = []
    for name, seed, folder in runs:
        path = folder / "plots" / "retriever_curve.csv"
        if path.exists():
            parts.append(pd.read_csv(path).assign(variant=name, seed=seed))
    if not parts:
        return pd.DataFrame(columns=["variant", "seed", "epoch", "train_loss", "val_recall@10"])
    frame = pd.concat(parts, ignore_index=True)
    return frame[["variant", "seed"] + [c for c in frame.columns if c not in ("variant", "seed")]]


def write_curves(curves: pd.DataFrame, root: Path) -> dict[str, Path]:
    """curves.csv and curves.png (validation Recall@10 by epoch) under the comparison folder."""
    with atomic_path(root / "curves.csv") as tmp:
        curves.to_csv(tmp, index=False)
    metric = next((c for c in curves.columns if c.startswith("val_recall@")), "val_recall@10")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, part) in enumerate(curves.groupby("variant", sort=False)):
        for j, (_, run) in enumerate(part.groupby("seed")):
            ax.plot(run["epoch"], run[metric], color=colors[i % len(colors)], alpha=0.8,
                    label=name if j == 0 else None)
    ax.set(xlabel="epoch", ylabel=metric.replace("val_", "validation "),
           title="Retriever validation curves (one line per seed)")
    ax.grid(alpha=0.3)
    if len(curves):
        ax.legend(fontsize=8)
    return {"csv": root / "curves.csv", "png": save_figure(fig, root / "curves.png")}

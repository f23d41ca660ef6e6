"""What each fusion objective costs the others: read back from the validation grid train_retriever wrote.

The grid (metrics/retriever_train.json `fusion_grid`) holds every (weights, rrf_k) point with its validation
recall at each eval.budgets K, so the point any objective would choose, and that point's recall at the
other budgets, is a lookup: no retraining to compare "rank for the top 10" with "generate 500 candidates"."""
from __future__ import annotations

import json

from components.retrieval.fusion import objective_choices, parse_objective
from components.runtime.errors import DataError
from components.runtime.paths import out_path


def objectives_table(params: dict) -> str:
    """A markdown table: one row per objective (each budget alone, balanced, the configured one, and the
    configured one with the generated weight held at 0), with its chosen weights and validation recalls."""
    path = out_path(params, "metrics", "retriever_train.json")
    if not path.exists():
        raise DataError(str(path), "not found (run the train_retriever step first)")
    grid = json.loads(path.read_text()).get("fusion_grid") or []
    budgets = [int(k) for k in params["eval"]["budgets"]]
    if not grid or any(f"recall@{k}" not in grid[0] for k in budgets):
        raise DataError(str(path), f"fusion_grid holds no validation recall at every eval.budgets {budgets}: "
                                   "train the retriever again with a fusion (retriever.fusion.sources)")
    configured = parse_objective(params["retriever"]["fusion"]["objective"])
    objectives = {**{f"recall@{k}": {k: 1.0} for k in budgets}, "balanced": "balanced",
                  f"configured {params['retriever']['fusion']['objective']}": configured}
    rows = objective_choices(grid, objectives, budgets)
    without = [t for t in grid if t["weights"]["generated"] == 0.0]
    rows += [{**r, "objective": f"{r['objective']} without generation"}
             for r in objective_choices(without, {"configured": configured}, budgets)]
    head = "| objective | weights (generated first) | rrf_k | " + " | ".join(f"val R@{k}" for k in budgets) + " |"
    lines = [head, "|" + "---|" * (3 + len(budgets))]
    for r in rows:
        order = ["generated"] + sorted(n for n in r["weights"] if n != "generated")
        weights = ", ".join(f"{n} {r['weights'][n]:.1f}" for n in order)
        lines.append(f"| {r['objective']} | {weights} | {r['rrf_k']} | "
                     + " | ".join(f"{r[f'recall@{k}']:.4f}" for k in budgets) + " |")
    return "\n".join(lines)

"""Flow: evaluation (retriever and baselines), with the headline metrics as a Prefect artifact."""
from __future__ import annotations

import json

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from components.runtime.config import params_hash
from components.runtime.paths import out_path
from flows.flow_params import apply_overrides, flow_run_name
from flows.tasks import run_and_log
from flows.tracking import flatten, numeric

MAX_ROWS = 60


def metrics_markdown(metrics: dict, title: str, max_rows: int = MAX_ROWS) -> str:
    """A markdown table of the numeric entries of a (nested) metrics dict."""
    rows = list(numeric(flatten(metrics)).items())
    lines = [f"## {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in rows[:max_rows]]
    if len(rows) > max_rows:
        lines.append(f"| ... {len(rows) - max_rows} more in the JSON file | |")
    return "\n".join(lines) + "\n"


@flow(name="evaluate", flow_run_name=flow_run_name)
def evaluate_flow(params: dict, overrides: list[str] | None = None) -> dict:
    """Evaluate the retriever and baselines; publish metrics/eval.json as a markdown artifact."""
    params = apply_overrides(params, overrides)
    summaries = run_and_log(params, ["evaluate"], "evaluate")
    eval_file = out_path(params, "metrics", "eval.json")
    if eval_file.exists():
        report = out_path(params, "report", "report.md")
        create_markdown_artifact(
            markdown=metrics_markdown(json.loads(eval_file.read_text()), f"Evaluation (params {params_hash(params)})")
            + f"\nFull report: `{report}`\n",
            key="evaluate-metrics",
            description="metrics/eval.json",
        )
    return summaries

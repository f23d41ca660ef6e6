"""Flow: the whole pipeline (prepare -> evaluate), composed of the training and evaluation flows."""
from __future__ import annotations

from prefect import flow

from components.pipeline.steps import STEPS
from components.runtime.errors import Sa2crqError, UnknownNameError
from flows.evaluate_flow import evaluate_flow
from flows.flow_params import apply_overrides, flow_run_name
from flows.step_io import metric_files
from flows.tasks import flow_lock, run_steps
from flows.tracking import log_flow, nested_flows
from flows.train_head_flow import train_head_flow
from flows.train_retriever_flow import train_retriever_flow
from flows.train_tail_flow import train_tail_flow


def select_steps(start: str, stop: str) -> list[str]:
    """The steps from start to stop inclusive, in pipeline order."""
    order = list(STEPS)
    for name in (start, stop):
        if name not in order:
            raise UnknownNameError(f"unknown step {name!r}; steps are: {', '.join(order)}")
    if order.index(start) > order.index(stop):
        raise Sa2crqError(f"start step {start!r} comes after stop step {stop!r}")
    return order[order.index(start): order.index(stop) + 1]


@flow(name="pipeline", flow_run_name=flow_run_name)
def pipeline_flow(params: dict, overrides: list[str] | None = None,
                  start: str = "prepare", stop: str = "evaluate") -> dict:
    """Run the selected steps: through DVC on its out_dir (what DVC finds up to date is skipped), else each step."""
    params = apply_overrides(params, overrides)
    steps = select_steps(start, stop)
    out: dict = {}
    with flow_lock(params), nested_flows():   # held across the steps (each takes it again)
        out.update(run_steps(params, [s for s in steps if s in ("prepare", "embed")]))
        if "train_head" in steps:
            out.update(train_head_flow(params))
        if "train_tail" in steps:
            out.update(train_tail_flow(params, assign="assign_ids" in steps))
        elif "assign_ids" in steps:
            out.update(run_steps(params, ["assign_ids"]))
        if "train_retriever" in steps:
            out.update(train_retriever_flow(params))
        if "evaluate" in steps:
            out.update(evaluate_flow(params))
    log_flow(params, "pipeline", out, {s: metric_files(params, s) for s in out})
    return out


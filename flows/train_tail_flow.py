"""Flow: Stage 2, anchored transfer to the tail, then SIDs issued for every item."""
from __future__ import annotations

from prefect import flow

from flows.flow_params import apply_overrides, flow_run_name
from flows.tasks import run_and_log


@flow(name="train-tail", flow_run_name=flow_run_name)
def train_tail_flow(params: dict, overrides: list[str] | None = None, assign: bool = True) -> dict:
    """Train the extension codebooks on tail items (head anchors frozen), then assign SIDs.

    `assign=False` stops after the tokenizer, for callers that issue SIDs themselves.
    """
    params = apply_overrides(params, overrides)
    steps = ["train_tail", "assign_ids"] if assign else ["train_tail"]
    return run_and_log(params, steps, "train-tail")

"""Flow: Stage 1, head curriculum training (codebooks and SARQ path tables on head items)."""
from __future__ import annotations

from prefect import flow

from flows.flow_params import apply_overrides, flow_run_name
from flows.tasks import run_and_log


@flow(name="train-head", flow_run_name=flow_run_name)
def train_head_flow(params: dict, overrides: list[str] | None = None) -> dict:
    """Train the head tokenizer (needs prepared/ and embeddings/); returns the step summary."""
    params = apply_overrides(params, overrides)
    return run_and_log(params, ["train_head"], "train-head")

"""Flow: Stage 1, head curriculum training (codebooks and SARQ path tables on head items)."""
from __future__ import annotations

from prefect import flow

from flows.flow_params import apply_overrides, flow_run_name
from flows.tasks import run_steps
from flows.tracking import wandb_run


@flow(name="train-head", flow_run_name=flow_run_name)
def train_head_flow(params: dict, overrides: list[str] | None = None) -> dict:
    """Train the head tokenizer (needs prepared/ and embeddings/); returns the step summary."""
    params = apply_overrides(params, overrides)
    with wandb_run(params, "train-head", "train_head") as run:
        return run_steps(params, ["train_head"], run)

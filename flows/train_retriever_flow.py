"""Flow: train the generative retriever on (query, SID) and indexing pairs."""
from __future__ import annotations

from prefect import flow

from flows.flow_params import apply_overrides, flow_run_name
from flows.tasks import run_and_log


@flow(name="train-retriever", flow_run_name=flow_run_name)
def train_retriever_flow(params: dict, overrides: list[str] | None = None) -> dict:
    """Train (or fine-tune, per params retriever.*) the retriever against the issued SIDs."""
    params = apply_overrides(params, overrides)
    return run_and_log(params, ["train_retriever"], "train-retriever")

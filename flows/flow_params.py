"""Params as flows receive them: the loaded params.yaml plus optional `key=value` overrides."""
from __future__ import annotations

from components.config import deep_merge, params_hash, parse_override


def apply_overrides(params: dict, overrides: list[str] | None) -> dict:
    """params with `a.b=value` overrides applied (the same syntax as `sa2crq -s` and dvc exp -S)."""
    for text in overrides or []:
        params = deep_merge(params, parse_override(text))
    return params


def flow_run_name() -> str:
    """`<flow>-<params hash>`: runs of the same configuration share a name in the UI."""
    from prefect.runtime import flow_run

    args = flow_run.parameters
    return f"{flow_run.flow_name}-{params_hash(apply_overrides(args.get('params', {}), args.get('overrides')))}"

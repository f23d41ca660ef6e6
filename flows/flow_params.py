"""Params as flows receive them: the loaded params.yaml plus optional `key=value` overrides."""
from __future__ import annotations

from components.runtime.config import params_hash, resolve_params
from components.runtime.errors import Sa2crqError


def apply_overrides(params: dict, overrides: list[str | dict] | None) -> dict:
    """params with `a.b=value` overrides applied and every key checked, by the path load_params takes
    (components.runtime.config.resolve_params): `profile=smoke` overlays profiles.smoke here too, and a
    bad value raises ConfigError naming its key at the start of the flow."""
    return resolve_params(params, overrides)


def flow_run_name() -> str:
    """`<flow>-<params hash>`: runs of the same configuration share a name in the UI."""
    from prefect.runtime import flow_run

    args = flow_run.parameters
    try:
        return f"{flow_run.flow_name}-{params_hash(apply_overrides(args.get('params', {}), args.get('overrides')))}"
    except Sa2crqError:  # the flow body raises it again, as the run's failure; a name must not
        return f"{flow_run.flow_name}-bad-params"

"""Serve the retrain flow: run it when a `sa2crq.new-items` event arrives and / or on a cron schedule.

    prefect server start --host 127.0.0.1                       # terminal 1
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve                                        # terminal 2 (blocks, runs flows)
    prefect event emit sa2crq.new-items --resource-id sa2crq.catalog \\
        --payload '{"path": "/abs/path/new_items.jsonl"}'       # terminal 3: a retrain starts

The served flow reads params.yaml (+ overrides) when it runs, so edits apply to the next run.
Event and schedule come from params flows.schedule (event name, cron, the file a scheduled
run reads). See docs/OPERATIONS.md.
"""
from __future__ import annotations

import argparse
import sys

from prefect import flow, serve
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

from components.runtime.config import load_params
from components.runtime.errors import ConfigError
from flows.retrain_flow import retrain_flow

DEPLOYMENT = "retrain"


@flow(name="retrain-on-new-items")
def retrain_deployment_flow(new_items: str, params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """What the deployment runs: load params now, then the retrain flow on the given file."""
    return retrain_flow(params=load_params(params_file, overrides), opt_new_items=new_items)


def new_items_trigger(event: str) -> DeploymentEventTrigger:
    """Run on every `event`; the payload's `path` is the new-items file."""
    return DeploymentEventTrigger(name=f"{DEPLOYMENT}-on-{event}", expect={event},
                                  parameters={"new_items": "{{ event.payload.path }}"})


def build_deployment(params: dict, params_file: str = "params.yaml", overrides: list[str] | None = None):
    """The retrain deployment: an event trigger always, a cron schedule when flows.schedule.cron is set."""
    sched = params.get("flows", {}).get("schedule", {}) or {}
    cron = str(sched.get("cron") or "")
    new_items = str(sched.get("new_items") or "")
    if cron and not new_items:
        raise ConfigError("flows.schedule.new_items", "a cron schedule needs the file a scheduled run reads")
    return retrain_deployment_flow.to_deployment(
        name=DEPLOYMENT,
        triggers=[new_items_trigger(str(sched.get("event") or "sa2crq.new-items"))],
        cron=cron or None,
        parameters={"new_items": new_items, "params_file": params_file, "overrides": list(overrides or [])},
        description="Give new items SIDs, fine-tune the retriever with replay, check recall, promote.",
    )


def main(argv: list[str] | None = None) -> int:
    from components.runtime.errors import guarded
    from components.runtime.prefect_api import check_prefect_api
    from components.runtime.runtime_env import set_offline_defaults

    set_offline_defaults()
    ap = argparse.ArgumentParser(description="Serve the retrain flow (event trigger and / or cron).")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("-s", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error (also: SA2CRQ_DEBUG=1)")
    args = ap.parse_args(argv)

    def run() -> int:
        deployment = build_deployment(load_params(args.params, args.set), args.params, args.set)
        check_prefect_api()
        serve(deployment)
        return 0

    return guarded(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())

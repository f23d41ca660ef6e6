"""Lightning loggers of the training steps: a CSV file of every logged metric under the run's
out_dir (`<out_dir>/logs/<job>/metrics.csv`, rewritten by each run), plus W&B offline unless W&B
is disabled (params `wandb.mode: disabled` or WANDB_MODE=disabled, as flows/tracking.py decides).

Worker ranks of a multi-process run (components.runtime.locks.launched_rank) log nothing: rank 0 logs.
"""
from __future__ import annotations

import os
import warnings

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from components.runtime.locks import launched_rank
from components.runtime.paths import out_path, wandb_dir


def wandb_enabled(params: dict) -> bool:
    mode = str(params.get("wandb", {}).get("mode", "offline"))
    return mode != "disabled" and os.environ.get("WANDB_MODE", "").lower() != "disabled"


def training_loggers(params: dict, job: str, config: dict) -> list[Logger]:
    """CSVLogger (and WandbLogger with `config` as the run's config) for one training job."""
    if launched_rank() != 0:
        return []
    warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists and is not empty.*")
    loggers: list[Logger] = [CSVLogger(str(out_path(params, "logs")), name=job, version="")]
    if wandb_enabled(params):
        import wandb

        run_dir = wandb_dir(params)
        run_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(mode=str(params.get("wandb", {}).get("mode", "offline")), dir=str(run_dir),
                         project=str(params.get("wandb", {}).get("project", "sa2crq")), job_type=job,
                         config={**config, "seed": params.get("seed")}, reinit="finish_previous")
        loggers.append(WandbLogger(experiment=run))
    return loggers


def finish(loggers: list[Logger]) -> None:
    """Close the W&B run a training job opened (CSV files are complete once fit returns)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()

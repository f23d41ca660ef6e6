"""Lightning loggers of the training steps: a CSV file of every logged metric under the run's
out_dir (`<out_dir>/logs/<job>/metrics.csv`, rewritten by each run), plus W&B offline unless W&B
is disabled (params `wandb.mode: disabled` or WANDB_MODE=disabled, as flows/tracking.py decides).

Worker ranks of a multi-process run (components.runtime.locks.launched_rank) log nothing: rank 0 logs.

What a Trainer prints (`line_progress`): on a terminal Lightning's own bar; with stderr redirected (a log
file, `sa2crq compare`'s stages) a `LineProgressBar`, whose whole lines read well after the fact, where
Lightning's bar printed frames or nothing until the end. Lightning's "💡 Tip:" adverts and its
PossibleUserWarning notes are left out either way.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings

import lightning as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning

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


# ---- what a Trainer prints -----------------------------------------------------------------------------
LINE_EVERY_S = 30.0   # as components.runtime.console's (not imported: it would add a code dep to the training stages)
# the loggers Lightning's rank_zero_info writes through (lightning_utilities rebinds its logger on import)
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                      "lightning_utilities.core.rank_zero", "pytorch_lightning.utilities.rank_zero")


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().lstrip().startswith("💡 Tip:")


_NO_TIPS = _NoTips()


def silence_lightning() -> None:
    """Leave out Lightning's tips (adverts for its cloud products) and its PossibleUserWarning notes (on
    data loader workers and logging intervals, which this project sets on purpose). Idempotent."""
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _NO_TIPS not in logger.filters:
            logger.addFilter(_NO_TIPS)
    warnings.filterwarnings("ignore", category=PossibleUserWarning)


def _stderr_is_tty() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):   # no stderr, or a closed one
        return False


def _fmt(value: object) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


class LineProgressBar(ProgressBar):
    """Training progress as whole lines on stderr (rank 0): when an epoch starts, at most once per
    `every_s` seconds while it runs, and with the progress-bar metrics (train_loss, val_recall@10) when it ends."""

    def __init__(self, every_s: float = LINE_EVERY_S):
        super().__init__()
        self.every_s, self.enabled = float(every_s), True
        self._last = float("-inf")

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _line(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)
            self._last = time.monotonic()

    def _metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        return ", ".join(f"{k} {_fmt(v)}" for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._line(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {self.total_train_batches} batches")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if time.monotonic() - self._last >= self.every_s:
            metrics = self._metrics(trainer, pl_module)
            self._line(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: batch {batch_idx + 1}/"
                       f"{self.total_train_batches}" + (f", {metrics}" if metrics else ""))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = self._metrics(trainer, pl_module)
        self._line(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} done" + (f": {metrics}" if metrics else ""))


def line_progress(enabled: bool = True) -> list[ProgressBar]:
    """The progress callbacks of a Trainer built with `enable_progress_bar=enabled`: a LineProgressBar
    when stderr is not a terminal, none on a terminal (Lightning's own bar). Silences Lightning's tips."""
    silence_lightning()
    return [LineProgressBar()] if enabled and not _stderr_is_tty() else []

"""Stop a training run whose loss or weights stop being finite, before anything is written.

A learning rate too large for the model (`retriever.lr: 1e30`) trained to loss nan, wrote a NaN
model.pt and exited 0. `StopOnDivergence` is a Lightning callback every trainer of the project
gets (the retriever, its retrain fine-tune, the two-tower baseline, the RQ-VAE / ACRQ / SARQ
tokenizers): it checks each step's loss and, at each epoch's end, the trainable weights, and
raises `TrainingDiverged` (one line naming the job and the params to look at). The exception
leaves Lightning's `fit`, so the caller's write of its checkpoint never runs.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from components.runtime.errors import Sa2crqError


class TrainingDiverged(Sa2crqError):
    """Training produced a non-finite loss or non-finite weights; nothing was written."""


def _loss_value(outputs: object) -> float | None:
    """The step's loss from what `training_step` returned (a tensor, or a dict with `loss`)."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else None


def bad_weights(module: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters holding a NaN or an infinity."""
    return [name for name, p in module.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]


class StopOnDivergence(Callback):
    """Raises TrainingDiverged at the first non-finite step loss or epoch-end weights.

    `job` names the run in the message (train_retriever, train_head, ...) and `keys` the params
    that usually cause it (a learning rate too large, no gradient clipping). In a multi-process
    run every rank takes the same decision (any rank's non-finite loss stops all of them), so no
    rank waits on one that stopped."""

    def __init__(self, job: str, keys: str):
        self.job, self.keys = job, keys

    def _stop(self, trainer: L.Trainer, bad: bool, what: str) -> None:
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise TrainingDiverged(f"{self.job}: training diverged at epoch {trainer.current_epoch}, step "
                                   f"{trainer.global_step} ({what}); nothing was written: lower {self.keys}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        loss = _loss_value(outputs)
        self._stop(trainer, loss is not None and not math.isfinite(loss), f"loss {loss}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bad = bad_weights(pl_module)
        self._stop(trainer, bool(bad), f"non-finite weights in {', '.join(bad[:3])}")

"""Fit a retriever and keep its best validation epoch, with Lightning's own callbacks.

`ModelCheckpoint` (weights only, top 1 by validation Recall@K, in a temporary folder) picks the
epoch; `EarlyStopping` ends training once validation recall has not improved for `patience`
epochs. Without validation queries the last epoch is kept. Shared by the train_retriever step
and the retrain fine-tune, so both select epochs the same way.
"""
from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from components.errors import ConfigError


def patience_param(value: object, key: str) -> int:
    """An early-stopping patience from params: a non-negative integer, else ConfigError naming the key."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, f"must be an integer >= 0 (0 = no early stopping), got {value!r}")
    return value


@dataclass
class FitResult:
    best_epoch: int
    best_score: float | None
    epochs_run: int
    stopped_early: bool


def fit_best_epoch(module: L.LightningModule, trainer_kwargs: dict, train_dl, val_dl, monitor: str,
                   patience: int) -> FitResult:
    """Train; load the best epoch's weights into `module` (ties keep the earlier epoch).

    patience <= 0 turns early stopping off (all epochs run, the best one is still kept).
    """
    with tempfile.TemporaryDirectory(prefix="sa2crq-ckpt-") as ckpt_dir, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*`isinstance.*treespec.*")
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
        warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
        callbacks: list = []
        checkpoint = None
        if val_dl is not None:
            checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch}", monitor=monitor, mode="max",
                                         save_top_k=1, save_weights_only=True, save_last=False)
            callbacks.append(checkpoint)
            if patience > 0:
                callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=patience, min_delta=0.0))
        trainer = L.Trainer(**trainer_kwargs, callbacks=callbacks, enable_checkpointing=checkpoint is not None,
                            num_sanity_val_steps=0)
        trainer.fit(module, train_dl, val_dl)
        epochs_run = int(trainer.current_epoch)
        if checkpoint is None or not checkpoint.best_model_path:
            return FitResult(epochs_run - 1, None, epochs_run, False)
        blob = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(blob["state_dict"])
        score = checkpoint.best_model_score
        return FitResult(int(blob["epoch"]), None if score is None else float(score), epochs_run,
                         epochs_run < int(trainer_kwargs.get("max_epochs", epochs_run)))

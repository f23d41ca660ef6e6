"""Fit a model and keep its best validation epoch, with Lightning's own callbacks.

`ModelCheckpoint` (weights only, top 1 by validation Recall@K, in a temporary folder) picks the
epoch; `EarlyStopping` ends training once validation recall has not improved for `patience`
epochs. Without validation queries the last epoch is kept. Shared by the train_retriever step,
the retrain fine-tune and the two-tower baseline, so all select epochs the same way.

Multi-process strategies (`retriever.trainer.strategy: ddp`, `ddp_spawn`, ...) train the same
way: with `ddp_spawn` the ranks live in child processes, and Lightning brings back to the
caller only the last weights and the best checkpoint's path, so global rank 0 writes what the
caller needs besides (epochs run, best score, the module's per-epoch `curve`) to a record file
(`FitRecord`), and the caller reloads the best checkpoint from disk. With `ddp` every rank
runs the caller's code; only global rank 0 gets `FitResult.is_global_zero` and may write outputs.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader

from components.runtime.divergence import StopOnDivergence
from components.runtime.train_loggers import line_progress


@dataclass
class FitResult:
    best_epoch: int
    best_score: float | None
    epochs_run: int
    stopped_early: bool
    curve: list[dict] = field(default_factory=list)   # the module's per-epoch rows, if it keeps any
    is_global_zero: bool = True                       # False on the other ranks of a `ddp` run: write nothing


class Loaders(L.LightningDataModule):
    """Ready DataLoaders as a DataModule: a training loader and an optional validation loader."""

    def __init__(self, train: DataLoader, val: DataLoader | None = None):
        super().__init__()
        self.train, self.val = train, val

    @property
    def validates(self) -> bool:
        return self.val is not None

    def train_dataloader(self) -> DataLoader:
        return self.train

    def val_dataloader(self) -> DataLoader | list:
        return self.val if self.val is not None else []


class FitRecord(Callback):
    """At the end of training, global rank 0 writes the epochs run, the best score and the
    module's `curve` (if any) to a JSON file: the caller reads them from there whether the ranks
    ran in its own process or in spawned ones (JSON keeps every float exactly)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        ckpt = trainer.checkpoint_callback
        score = getattr(ckpt, "best_model_score", None) if ckpt is not None else None
        record = {"epochs_run": int(trainer.current_epoch), "best_score": None if score is None else float(score),
                  "curve": list(getattr(pl_module, "curve", []))}
        self.path.write_text(json.dumps(record))


def fit_best_epoch(module: L.LightningModule, trainer_kwargs: dict, data: L.LightningDataModule, monitor: str,
                   patience: int, job: str = "training", keys: str = "the learning rate") -> FitResult:
    """Train on `data` (a DataModule whose `validates` says whether it has validation batches);
    load the best epoch's weights into `module` (ties keep the earlier epoch).

    patience <= 0 turns early stopping off (all epochs run, the best one is still kept). A step
    with a non-finite loss (or an epoch ending with non-finite weights) raises TrainingDiverged
    naming `job` and the params `keys` to lower, even when an earlier epoch was good: a run that
    diverged is not a result (components/runtime/divergence.py).
    """
    with tempfile.TemporaryDirectory(prefix="sa2crq-ckpt-") as ckpt_dir, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*`isinstance.*treespec.*")
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
        warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        record_path = Path(ckpt_dir) / "fit_record.json"
        callbacks: list = [StopOnDivergence(job, keys)]
        checkpoint = None
        if data.validates:
            checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch}", monitor=monitor, mode="max",
                                         save_top_k=1, save_weights_only=True, save_last=False)
            callbacks.append(checkpoint)
            if patience > 0:
                callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=patience, min_delta=0.0))
        callbacks.append(FitRecord(record_path))
        callbacks += line_progress(trainer_kwargs.get("enable_progress_bar", True))
        trainer = L.Trainer(**trainer_kwargs, callbacks=callbacks, enable_checkpointing=checkpoint is not None,
                            num_sanity_val_steps=0)
        trainer.fit(module, datamodule=data)
        if not trainer.is_global_zero:   # a `ddp` rank > 0: rank 0 owns the record and the checkpoint
            return FitResult(-1, None, 0, False, is_global_zero=False)
        record = json.loads(record_path.read_text())
        epochs_run, curve = int(record["epochs_run"]), record["curve"]
        if checkpoint is None or not checkpoint.best_model_path:
            return FitResult(epochs_run - 1, None, epochs_run, False, curve)
        blob = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(blob["state_dict"])
        score = record["best_score"]
        return FitResult(int(blob["epoch"]), score, epochs_run,
                         epochs_run < int(trainer_kwargs.get("max_epochs", epochs_run)), curve)

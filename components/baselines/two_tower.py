"""A trained dense two-tower retriever (the paper's DPR row), in Lightning.

Query tower: the retriever's own query encoder (components.retrieval.query_encoders.QueryEncoder: frozen
MiniLM text embedding -> n_memory vectors, or the history items' embeddings with recency
positions), masked-mean pooled and passed through a residual MLP. Item tower: a residual MLP
projection of the frozen item embedding. Trained with in-batch softmax on the training
split's (query, target) pairs; a batch's other copies of the positive item are masked out so
popular items are not pushed away from themselves. With validation queries, each epoch is
scored by validation Recall@10 over all items and the best epoch is kept, with early stopping
(components/retrieval/best_epoch.py): the epoch count is chosen on each dataset's own validation split,
not carried over from another catalog. The recipe is counted in optimizer steps, which carry over between
catalogs where epochs do not (a small catalog's epoch is a few steps): the learning rate warms up linearly
over `warmup_steps`, and early stopping counts its patience only once `min_steps` are done, so a catalog
whose validation recall is flat for its first short epochs is not stopped before it has learnt (a 9k-item
movie catalog was stopped after 45 steps, below most-popular). Deterministic for a given seed. Lightning-native: a
DataModule (`TwoTowerData`), the accelerator from `eval.two_tower.accelerator` (default auto),
loggers from the caller (CSV under out_dir, W&B unless disabled).
"""
from __future__ import annotations

import math

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.nn import functional as F

from components.baselines.classic import dense_search
from components.ranking.queries import check_queries, history_rows, item_rows
from components.retrieval.best_epoch import fit_best_epoch
from components.retrieval.query_encoders import HISTORY, TEXT, QueryEncoder
from components.runtime.config_schema import typed_params
from components.runtime.errors import DataError

VAL_K = 10


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning-rate multiplier at optimizer step `step` (0-based): linear from 1/warmup_steps to 1 over
    the first warmup_steps steps, then 1 (warmup_steps 0 = no warm-up)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def epoch_cap(epochs: int, min_steps: int, steps_per_epoch: int, patience: int) -> int:
    """The most epochs to run: `epochs`, raised where epochs are short so that `min_steps` steps and then
    `patience` epochs fit (otherwise the cap, not validation, would end a small catalog's training)."""
    return max(epochs, math.ceil(min_steps / max(steps_per_epoch, 1)) + patience)


class PatienceAfter(EarlyStopping):
    """Lightning's EarlyStopping on validation recall, counting its patience only once `min_steps`
    optimizer steps are done: the recall of the first short epochs (warm-up included) cannot stop training.
    The best epoch is still kept over all epochs (ModelCheckpoint in fit_best_epoch)."""

    def __init__(self, monitor: str, patience: int, min_steps: int):
        super().__init__(monitor=monitor, mode="max", patience=patience, min_delta=0.0)
        self.min_steps = min_steps

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step >= self.min_steps:
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step >= self.min_steps:
            super().on_validation_end(trainer, pl_module)


def query_index_table(queries: pd.DataFrame, items: pd.DataFrame, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows into [items.npy ; queries.npy ; zero row] per query, left-aligned, -1 padded; and is_text.

    Text queries hold one index (n_items + emb_row); history queries their last max_len items,
    oldest first (the layout QueryEncoder expects).
    """
    n_items = len(items)
    is_text = check_queries(queries).to_numpy(copy=True)
    out = np.full((len(queries), max_len), -1, dtype=np.int64)
    out[is_text, 0] = n_items + queries.loc[is_text, "emb_row"].to_numpy(dtype=np.int64)
    hist_pos = np.flatnonzero(~is_text)
    for pos, rows in zip(hist_pos, history_rows(queries.iloc[hist_pos], item_rows(items), max_len)):
        out[pos, : len(rows)] = rows
    return out, is_text


class QueryTower(nn.Module):
    """Frozen vectors -> QueryEncoder memory -> masked mean -> residual MLP -> unit vector."""

    def __init__(self, table: torch.Tensor, dim: int, max_len: int, n_memory: int, dropout: float):
        super().__init__()
        self.table = nn.Embedding.from_pretrained(table, freeze=True)
        self.encoder = QueryEncoder(table.shape[1], dim, n_memory, max_len, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.pad = table.shape[0] - 1
        self.dim = dim

    def _pool(self, kind: str, idx: torch.Tensor) -> torch.Tensor:
        mask = idx >= 0
        x = self.table(torch.where(mask, idx, self.pad))
        if kind == TEXT:
            x, mask = x[:, :1], mask[:, :1]
        memory, keep = self.encoder({"kind": kind, "x": x, "mask": mask})
        keep = keep.unsqueeze(-1).float()
        return (memory * keep).sum(1) / keep.sum(1).clamp(min=1.0)

    def forward(self, idx: torch.Tensor, is_text: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(len(idx), self.dim, device=idx.device)
        for kind, sel in ((TEXT, is_text), (HISTORY, ~is_text)):
            if bool(sel.any()):
                h[sel] = self._pool(kind, idx[sel])
        return F.normalize(h + self.mlp(h), dim=-1)


class ItemTower(nn.Module):
    """Residual MLP projection of a frozen item embedding to a unit vector."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return F.normalize(h + self.mlp(h), dim=-1)


class TwoTower(L.LightningModule):
    """In-batch softmax over unit-vector dot products divided by a fixed temperature; AdamW with a linear
    warm-up, and its own early stopping (PatienceAfter) when it has validation queries."""

    def __init__(self, table: torch.Tensor, item_emb: torch.Tensor, cfg: dict):
        super().__init__()
        self.save_hyperparameters(cfg)
        dim = int(cfg["dim"])
        self.query_tower = QueryTower(table, dim, int(cfg["max_len"]), int(cfg["n_memory"]), float(cfg["dropout"]))
        self.item_tower = ItemTower(item_emb.shape[1], dim)
        self.register_buffer("item_emb", item_emb, persistent=False)
        self.lr = float(cfg["lr"])
        self.temperature = float(cfg["temperature"])
        self.warmup_steps = int(cfg.get("warmup_steps", 0))
        self.min_steps = int(cfg.get("min_steps", 0))
        self.patience = int(cfg["patience"])
        self.logq = bool(cfg.get("logq", False))
        self.register_buffer("log_q", torch.zeros(len(item_emb)), persistent=False)
        self.val_queries: tuple[torch.Tensor, torch.Tensor, list[np.ndarray]] | None = None

    @torch.no_grad()
    def scores(self, q_idx: torch.Tensor, is_text: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
        """(queries, items) cosine scores over the whole catalog."""
        items = torch.cat([self.item_tower(self.item_emb[s:s + batch_size])
                           for s in range(0, len(self.item_emb), batch_size)])
        return torch.cat([self.query_tower(q_idx[s:s + batch_size], is_text[s:s + batch_size]) @ items.T
                          for s in range(0, len(q_idx), batch_size)])

    def validation_step(self, batch, batch_idx: int) -> None:
        """Recall@10 of every validation query at once (the loader holds one dummy batch)."""
        q_idx, is_text, targets = self.val_queries
        top = self.scores(q_idx.to(self.device), is_text.to(self.device)).topk(
            min(VAL_K, len(self.item_emb)), dim=1).indices.cpu().numpy()
        recall = np.mean([np.isin(t, row).mean() for t, row in zip(targets, top)])
        self.log(f"val_recall@{VAL_K}", float(recall), prog_bar=True)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        q_idx, is_text, target = batch
        q = self.query_tower(q_idx, is_text)
        i = self.item_tower(self.item_emb[target])
        logits = q @ i.T / self.temperature
        if self.logq:
            logits = logits - self.log_q[target][None, :]
        same = (target[:, None] == target[None, :]) & ~torch.eye(len(target), dtype=torch.bool, device=target.device)
        loss = F.cross_entropy(logits.masked_fill(same, float("-inf")), torch.arange(len(target), device=q.device))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_factor(step, self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def configure_callbacks(self) -> list:
        """Early stopping after min_steps (fit_best_epoch is called with patience 0 so it adds none of its own)."""
        if self.val_queries is None or self.patience <= 0:
            return []
        return [PatienceAfter(f"val_recall@{VAL_K}", self.patience, self.min_steps)]


def _train_pairs(train: pd.DataFrame, items: pd.DataFrame) -> np.ndarray:
    """(query position, target item row) for every (train query, target) pair."""
    rows = item_rows(items)
    pairs = []
    for p, (label, targets) in enumerate(zip(train.index, train["targets"])):
        for t in targets:
            if t not in rows:
                raise DataError("prepared/queries.parquet", f"target {t!r} is not in prepared/items.parquet",
                                column="targets", rows=[label])
            pairs.append((p, rows[t]))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _target_rows(queries: pd.DataFrame, items: pd.DataFrame) -> list[np.ndarray]:
    rows = item_rows(items)
    return [np.array([rows[t] for t in targets if t in rows], dtype=np.int64) for targets in queries["targets"]]


class TwoTowerData(L.LightningDataModule):
    """(query rows, is_text, target item row) training batches in a seeded shuffled order; with
    validation queries, one dummy batch that triggers the whole-catalog validation."""

    def __init__(self, train: torch.utils.data.TensorDataset, batch_size: int, seed: int, validates: bool):
        super().__init__()
        self.train, self.batch_size, self.seed, self.validates = train, batch_size, seed, validates

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.train, batch_size=self.batch_size, shuffle=True,
                                           drop_last=len(self.train) > self.batch_size,
                                           generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> torch.utils.data.DataLoader | list:
        if not self.validates:
            return []
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(1)), batch_size=1)


def train_two_tower(train: pd.DataFrame, items: pd.DataFrame, item_emb: np.ndarray, query_emb: np.ndarray | None,
                    cfg: dict, seed: int, valid: pd.DataFrame | None = None,
                    loggers: list[Logger] | None = None) -> TwoTower:
    """Fit the two-tower model on the training queries; with `valid`, keep the best validation epoch.

    cfg: dim, max_len, n_memory, dropout, lr, temperature, batch_size, epochs (the most, see epoch_cap), patience
    (counted after min_steps), warmup_steps and min_steps (absent = 0: off), accelerator (default auto).
    """
    L.seed_everything(seed, workers=True, verbose=False)
    dim_in = item_emb.shape[1]
    q_emb = query_emb if query_emb is not None else np.zeros((0, dim_in), np.float32)
    table = torch.from_numpy(np.concatenate([item_emb, q_emb, np.zeros((1, dim_in))]).astype(np.float32))
    q_idx, is_text = query_index_table(train, items, int(cfg["max_len"]))
    pairs = _train_pairs(train, items)
    model = TwoTower(table, torch.from_numpy(np.asarray(item_emb, np.float32)), cfg)
    counts = np.bincount(pairs[:, 1], minlength=len(item_emb))
    model.log_q.copy_(torch.from_numpy(np.log(np.maximum(counts, 1) / max(len(pairs), 1))).float())
    data = torch.utils.data.TensorDataset(torch.from_numpy(q_idx[pairs[:, 0]]),
                                          torch.from_numpy(is_text[pairs[:, 0]]), torch.from_numpy(pairs[:, 1]))
    batch_size = int(cfg["batch_size"])
    steps_per_epoch = len(data) // batch_size if len(data) > batch_size else 1   # drop_last, as TwoTowerData
    max_epochs = epoch_cap(int(cfg["epochs"]), model.min_steps, steps_per_epoch, model.patience)
    kwargs = dict(max_epochs=max_epochs, accelerator=cfg.get("accelerator", "auto"), devices=1,
                  deterministic=True, logger=loggers or False, enable_model_summary=False, enable_progress_bar=True)
    validates = valid is not None and len(valid) > 0
    if validates:
        v_idx, v_text = query_index_table(valid, items, int(cfg["max_len"]))
        model.val_queries = (torch.from_numpy(v_idx), torch.from_numpy(v_text), _target_rows(valid, items))
    model.fit_result = fit_best_epoch(model, kwargs, TwoTowerData(data, batch_size, seed, validates),
                                      f"val_recall@{VAL_K}", 0)   # the model's own PatienceAfter stops early
    return model.cpu().eval()


@torch.no_grad()
def two_tower_search(model: TwoTower, queries: pd.DataFrame, items: pd.DataFrame, k: int,
                     batch_size: int = 2048) -> pd.DataFrame:
    """Ranked results of the trained model for `queries` (exact search over all items)."""
    q_idx, is_text = query_index_table(queries, items, model.query_tower.encoder.history.max_history)
    q_idx, is_text = torch.from_numpy(q_idx), torch.from_numpy(is_text)
    q_vecs = [model.query_tower(q_idx[s:s + batch_size], is_text[s:s + batch_size])
              for s in range(0, len(q_idx), batch_size)]
    i_vecs = torch.cat([model.item_tower(model.item_emb[s:s + batch_size])
                        for s in range(0, len(model.item_emb), batch_size)])
    q_mat = torch.cat(q_vecs) if q_vecs else torch.zeros(0, i_vecs.shape[1])
    return dense_search(q_mat.numpy(), i_vecs.numpy(), queries["query_id"], items["item_id"].to_numpy(), k)


def two_tower(train: pd.DataFrame, test: pd.DataFrame, items: pd.DataFrame, item_emb: np.ndarray,
              query_emb: np.ndarray | None, cfg: dict, seed: int, k: int,
              valid: pd.DataFrame | None = None, loggers: list[Logger] | None = None) -> pd.DataFrame:
    """Train on `train` (epochs chosen on `valid` when given), then return the top-k ranked results for `test`."""
    model = train_two_tower(train, items, item_emb, query_emb, cfg, seed, valid, loggers)
    frame = two_tower_search(model, test, items, k)
    fit = model.fit_result
    frame.attrs["two_tower"] = {"best_epoch": fit.best_epoch, "best_val_recall@10": fit.best_score,
                                "epochs_run": fit.epochs_run}
    return frame


def two_tower_config(params: dict) -> dict:
    """eval.two_tower plus the query-encoder shape the retriever uses."""
    p = typed_params(params)
    return {"dim": p.retriever.d_model, "n_memory": p.retriever.n_memory, "dropout": p.retriever.dropout,
            "max_len": p.data.max_history, **p.eval.two_tower.model_dump()}


def run_two_tower(params: dict, data, k: int) -> pd.DataFrame:
    """The `two_tower` baseline's runner (components/baselines/registry.py): trained with the run's seed on
    the train split (epochs chosen on valid), logged like the other training steps."""
    from components.runtime.train_loggers import finish, training_loggers

    cfg = two_tower_config(params)
    loggers = training_loggers(params, "two_tower", {"two_tower": cfg})
    try:
        return two_tower(data.train, data.test, data.items, data.item_emb, data.query_emb, cfg,
                         int(params["seed"]), k, valid=data.valid, loggers=loggers)
    finally:
        finish(loggers)

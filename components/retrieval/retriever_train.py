"""Step `train_retriever`: fit the generative retriever on (query, SID) and indexing pairs.

Writes retriever/model.pt (best validation epoch), plots/retriever_curve.csv (epoch,
train_loss, val_recall@10) and metrics/retriever_train.json.
"""
from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from components.retrieval.best_epoch import fit_best_epoch
from components.retrieval.fusion_tuning import tune_fusion, validation_queries
from components.retrieval.retriever import RetrieverModel, RetrieverModule, model_config, save_retriever
from components.retrieval.retriever_data import (
    KIND_HISTORY,
    KIND_TEXT,
    BucketBatchSampler,
    ExampleDataset,
    Examples,
    RetrieverInputs,
    indexing_pairs,
    load_inputs,
    query_examples,
    training_pairs,
)
from components.runtime.atomic import atomic_path, write_json
from components.runtime.config_schema import typed_params
from components.runtime.errors import ConfigError
from components.runtime.paths import out_path
from components.runtime.runtime_env import set_offline_defaults
from components.runtime.train_loggers import finish, training_loggers

VAL_K = 10


def build_examples(inputs: RetrieverInputs, rp: dict, max_history: int, seed: int
                   ) -> tuple[Examples, Examples, np.ndarray, dict]:
    """Training examples (pairs + indexing pairs), validation examples, text vectors, counts."""
    q = inputs.queries
    text_rows = q["emb_row"].to_numpy(dtype=np.int64)
    train_q = (q["split"] == "train").to_numpy()
    valid_q = (q["split"] == "valid").to_numpy()
    train = training_pairs(query_examples(q[train_q], inputs.item_index, text_rows[train_q], max_history))
    valid = query_examples(q[valid_q], inputs.item_index, text_rows[valid_q], max_history)
    cap = int(rp["val_max_queries"])
    if cap and len(valid) > cap:
        valid = valid.take(np.sort(np.random.default_rng(seed).choice(len(valid), cap, replace=False)))
    # items are indexed through the query path the data has: one-item histories, or item text vectors
    kinds = np.concatenate([train.kind, valid.kind])
    index_kind = KIND_HISTORY if (kinds == KIND_HISTORY).any() or not len(kinds) else KIND_TEXT
    text_vectors = np.concatenate([inputs.query_emb, inputs.item_emb]) if index_kind == KIND_TEXT else inputs.query_emb
    parts = [train]
    if rp["indexing_pairs"]:
        parts.append(indexing_pairs(len(inputs.items), index_kind, len(inputs.query_emb), max_history))
    examples = Examples.concat(parts)
    if not len(examples):
        raise ConfigError("retriever.indexing_pairs", "no training pairs and no indexing pairs: nothing to train on")
    counts = {"n_train_pairs": int(len(train)), "n_indexing_pairs": int(len(examples) - len(train)),
              "n_val_queries": int(len(valid)), "index_kind": "history" if index_kind == KIND_HISTORY else "text"}
    return examples, valid, text_vectors, counts


class RetrieverData(L.LightningDataModule):
    """Training batches (seeded buckets, sharded over the ranks of a multi-process run) and the
    validation batches (every rank decodes all of them, so each logs the same recall)."""

    def __init__(self, train_ds: ExampleDataset, train_keys: np.ndarray, val_ds: ExampleDataset,
                 val_keys: np.ndarray, batch_size: int, decode_batch_size: int, seed: int):
        super().__init__()
        self.train_ds, self.train_keys, self.val_ds, self.val_keys = train_ds, train_keys, val_ds, val_keys
        self.batch_size, self.decode_batch_size, self.seed = batch_size, decode_batch_size, seed

    @property
    def validates(self) -> bool:
        return len(self.val_keys) > 0

    def train_dataloader(self) -> DataLoader:
        rank, replicas = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = BucketBatchSampler(self.train_keys, self.batch_size, shuffle=True, seed=self.seed, rank=rank,
                                     replicas=replicas)
        return DataLoader(self.train_ds, sampler=sampler, batch_size=None)

    def val_dataloader(self) -> DataLoader | list:
        if not self.validates:
            return []
        return DataLoader(self.val_ds, sampler=BucketBatchSampler(self.val_keys, self.decode_batch_size, shuffle=False),
                          batch_size=None)


def trainer_args(rp: dict, epochs: int, logger, root: Path) -> dict:
    """L.Trainer arguments from `retriever.trainer` (accelerator, devices, num_nodes, strategy,
    precision), shared by training and the retrain fine-tune so both run on what the params ask for."""
    tr = rp["trainer"]
    return dict(max_epochs=epochs, accelerator=tr["accelerator"], devices=tr["devices"],
                num_nodes=int(tr["num_nodes"]), strategy=tr["strategy"], precision=tr["precision"],
                logger=logger, deterministic=True, use_distributed_sampler=False, enable_model_summary=False,
                gradient_clip_val=float(rp["grad_clip"]), default_root_dir=str(root),
                log_every_n_steps=10, check_val_every_n_epoch=1)


def prepare_training(params: dict) -> tuple[int, int, RetrieverInputs, tuple]:
    """Seed, thread count, inputs and examples: shared by training and the retrain fine-tune."""
    rp = params["retriever"]
    seed = int(params["seed"])
    torch.set_num_threads(int(rp["num_threads"]))
    L.seed_everything(seed, workers=True, verbose=False)
    max_history = int(params["data"]["max_history"])
    inputs = load_inputs(params)
    return seed, max_history, inputs, build_examples(inputs, rp, max_history, seed)


def run_train_retriever(params: dict) -> dict:
    """Train (early stopping on validation Recall@10), keep the best epoch, write the checkpoint,
    curve and metrics."""
    set_offline_defaults()
    patience = typed_params(params).retriever.patience   # the params' check, before any work
    rp = params["retriever"]
    seed, max_history, inputs, (examples, valid, text_vectors, counts) = prepare_training(params)

    config = model_config(rp, inputs.codebook_sizes, inputs.item_emb.shape[1], max_history, len(inputs.items))
    config["sid_version"] = inputs.sid_version
    net = RetrieverModel(config, load_pretrained=True).train()
    net.attach_catalog(inputs.catalog)
    if net.scorer is not None:
        net.attach_items(inputs.item_emb, inputs.catalog.popularity)
    data = RetrieverData(ExampleDataset(examples, text_vectors, inputs.item_emb, net.vocab, inputs.catalog),
                         examples.bucket_keys(), ExampleDataset(valid, text_vectors, inputs.item_emb, net.vocab,
                                                                inputs.catalog),
                         valid.bucket_keys(), int(rp["batch_size"]), int(rp["decode_batch_size"]), seed)
    epochs = int(rp["epochs"])
    module = RetrieverModule(net, lr=float(rp["lr"]), weight_decay=float(rp["weight_decay"]),
                             eval_beam=int(rp["eval_beam"]), val_k=VAL_K,
                             warmup_steps=int(rp["warmup_steps"]), total_steps=None)
    run_dir = Path("runs")
    loggers = training_loggers(params, "train_retriever", {"retriever": rp})
    start = time.perf_counter()
    try:   # a run that diverged (TrainingDiverged) still closes its W&B run, and writes nothing below
        fit = fit_best_epoch(module, trainer_args(rp, epochs, loggers, run_dir / "lightning"), data,
                             f"val_recall@{VAL_K}", patience, job="train_retriever",
                             keys="retriever.lr or retriever.grad_clip")
    finally:
        finish(loggers)
    if not fit.is_global_zero:   # another rank of a `ddp` run: rank 0 writes the outputs
        return {}
    fusion, fusion_grid = tune_fusion(params, net.eval(), validation_queries(
        inputs.queries, int(rp["fusion"]["val_max_queries"]), seed))
    if fusion is not None:
        net.config["fusion"] = fusion
    seconds = time.perf_counter() - start
    save_retriever(net, out_path(params, "retriever", "model.pt"))
    curve = pd.DataFrame(fit.curve, columns=["epoch", "train_loss", f"val_recall@{VAL_K}"])
    with atomic_path(out_path(params, "plots", "retriever_curve.csv")) as tmp:
        curve.to_csv(tmp, index=False)
    summary = {
        "backbone": config["backbone"], "n_params": int(sum(p.numel() for p in net.parameters())),
        "epochs": epochs, "epochs_run": fit.epochs_run, "stopped_early": fit.stopped_early,
        "best_epoch": fit.best_epoch, f"best_val_recall@{VAL_K}": fit.best_score,
        f"final_val_recall@{VAL_K}": float(curve[f"val_recall@{VAL_K}"].iloc[-1]) if len(valid) else None,
        "train_seconds": round(seconds, 2), "seconds_per_epoch": round(seconds / max(fit.epochs_run, 1), 2),
        "eval_beam": int(rp["eval_beam"]), "sid_version": inputs.sid_version, "n_sids": int(inputs.catalog.n_sids),
        "item_head": net.scorer is not None, "fusion": fusion, "fusion_grid": fusion_grid,
        **counts,
    }
    write_json(summary, out_path(params, "metrics", "retriever_train.json"))
    return summary

"""The RQ-VAE tokenizer methods' hooks, one trainer with switches: rqvae (TIGER), sarq (+ adaptive length),
acrq (Stage 1 on head items, Stage 2 extensions on the rest), sa2crq (both); registered in builtin.py."""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from components.runtime.errors import DataError
from components.runtime.paths import out_path
from components.runtime.train_loggers import finish, training_loggers
from components.tokenizers.acrq import anchored_model
from components.tokenizers.quantizer import ResidualQuantizer
from components.tokenizers.rqvae import RQVAE, SarqSpec, fit
from components.tokenizers.sarq import unique_floor
from components.tokenizers.sid_tokenizer import Tokenizer, save_checkpoint
from components.tokenizers.tokenizer_stages import (
    FORMAT,
    HeadRun,
    TailRun,
    load_catalog,
    make_tokenizer,
    sarq_spec,
    small_head_warning,
    train_spec,
)


def train_head(run: HeadRun) -> None:
    """The RQ-VAE (+ SARQ when adaptive) on all items, or for a two-stage method Stage 1 on the head
    items, whose SIDs are issued here (ckpt['issued'])."""
    cfg, items, x, ckpt, summary = run.cfg, run.items, run.x, run.ckpt, run.summary
    stage1 = cfg.two_stage
    train = (items["group"] == "head").to_numpy() if stage1 else np.ones(len(items), dtype=bool)
    if not train.any():
        raise DataError(str(out_path(run.params, "prepared", "items.parquet")),
                        f"no head items: tokenizer.method={cfg.method} trains Stage 1 on head items", column="group")
    small = small_head_warning(int(train.sum()), cfg.sizes, cfg.head_encoder) if stage1 else None
    if small:
        warnings.warn(small)
        ckpt["small_head_warning"] = summary["small_head_warning"] = small
    model = RQVAE(x.shape[1], cfg.hidden_dims, cfg.latent_dim, ResidualQuantizer(cfg.sizes, cfg.latent_dim))
    sarq = sarq_spec(cfg, items["popularity"].to_numpy()[train]) if cfg.adaptive else None
    if sarq is not None and stage1:  # tau: auto meets its target over the whole catalog
        sarq.tau_items = torch.from_numpy(x)
    spec = train_spec(cfg, cfg.epochs_head if stage1 else cfg.epochs_full)
    # head_encoder=all: encoder and decoder also reconstruct every item; codebooks stay head-only
    recon_x = torch.from_numpy(x) if stage1 and cfg.head_encoder == "all" else None
    loggers = training_loggers(run.params, "train_head", {"tokenizer": run.params["tokenizer"]})
    summary["train"] = fit(model, torch.from_numpy(x[train]), spec, sarq, init_kmeans=True,
                           recon_x=recon_x, loggers=loggers)
    finish(loggers)
    summary["n_train"] = int(train.sum())
    if recon_x is not None:
        summary["n_recon"] = len(recon_x)
    tok = make_tokenizer(cfg, model, model.quantizer, run.version, table=model.table,
                         tau=sarq.tau if sarq is not None else None)
    ckpt["tokenizer"] = tok.state()
    if cfg.tau_target is not None:
        summary["tau_chosen"] = tok.tau
    ckpt["history"] = spec.history
    if stage1:
        codes, lengths = tok.assign(x[train])
        if cfg.unique_head:
            lengths = unique_floor(codes, lengths, cfg.max_len)
        ckpt["issued"] = {"item_ids": items["item_id"].astype(str)[train].tolist(),
                          "codes": torch.from_numpy(codes), "lengths": torch.from_numpy(lengths)}


def train_tail(run: TailRun) -> dict:
    """Stage 2: anchors + extensions on tail items, and cold items unless tokenizer.stage2_items is
    tail (left-out items get their SIDs from the frozen result in assign_ids, like every item)."""
    cfg, params, head = run.cfg, run.params, run.head
    items, x = load_catalog(params)
    stage1 = Tokenizer.from_state(head["tokenizer"])
    model = anchored_model(stage1.model, cfg.ext_sizes)
    groups = ("tail",) if cfg.stage2_items == "tail" else ("tail", "cold")
    train = items["group"].isin(groups).to_numpy()
    sarq = None
    if cfg.adaptive:
        sarq = SarqSpec(tau=stage1.tau, min_len=cfg.min_len, max_len=cfg.max_len, smoothing=cfg.smoothing,
                        frozen_table=stage1.table)
    spec = train_spec(cfg, cfg.epochs_tail)
    loggers = training_loggers(params, "train_tail", {"tokenizer": params["tokenizer"]})
    result = fit(model, torch.from_numpy(x[train]), spec, sarq, init_kmeans=True, loggers=loggers)
    finish(loggers)
    tok = make_tokenizer(cfg, model, model.quantizer, head["version"], table=stage1.table,
                         anchor_sizes=model.quantizer.anchor_sizes, tau=stage1.tau)
    save_checkpoint({"format": FORMAT, "method": cfg.method, "stage2": True, "version": head["version"],
                     "tokenizer": tok.state(), "history": spec.history}, out_path(params, "tokenizer", "tail.pt"))
    return {"method": cfg.method, "stage2": True, "n_train": int(train.sum()), "stage2_items": cfg.stage2_items,
            "train": result,
            "codebook_sizes": model.quantizer.sizes, "wall_s": round(time.perf_counter() - run.start, 2)}


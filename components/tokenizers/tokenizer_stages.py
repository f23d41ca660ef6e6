"""The tokenizer steps: train_head -> tokenizer/head.pt, train_tail -> tokenizer/tail.pt,
assign_ids -> sids/ + metrics/sid_stats.json + plots. Behaviour comes from params alone.

Each `tokenizer.method` is a registration (components/tokenizers/registry.py; the built-in ones in
rq_kmeans.py, rqvae_methods.py, imported.py; table: docs/TOKENIZERS.md): its train_head hook, an
optional Stage 2, an optional assign_ids, and switches (adaptive length, collision token) of the
shared machinery here.

`tokenizer.import_unknown: drop` leaves out imported ids the catalog lacks (default `error`).

`tokenizer.head_encoder: all` lets the Stage-1 encoder / decoder also learn reconstruction
from every item (codebooks still from head items); `tokenizer.stage2_items: tail` keeps cold
items out of Stage 2 (they get SIDs from the frozen tokenizer like any item). A head small
for the codebooks is warned about (`small_head_warning`).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import faiss
import numpy as np
import pandas as pd
import torch

from components.runtime.atomic import write_json
from components.runtime.config import params_hash
from components.runtime.config_schema import typed_params
from components.runtime.errors import ConfigError, DataError
from components.runtime.paths import out_path
from components.runtime.safe_load import load_matrix, read_frame
from components.tokenizers import builtin  # noqa: F401  (registers the built-in methods: they are DVC deps)
from components.tokenizers.quantizer import ResidualQuantizer
from components.tokenizers.registry import TokenizerMethod, get_method, methods
from components.tokenizers.rqvae import RQVAE, SarqSpec, TrainSpec
from components.tokenizers.sarq import parse_tau, popularity_weights, unique_floor
from components.tokenizers.sid_stats import plot_sid_stats, sid_statistics
from components.tokenizers.sid_table import (
    assert_issued_reencode,
    collision_codes,
    collision_layer_size,
    make_sid_table,
    sid_version,
    write_sid_table,
)
from components.tokenizers.sid_tokenizer import (
    Tokenizer,
    assign_new_items,
    load_checkpoint,
    load_tokenizer,
    save_checkpoint,
)

FORMAT = 1

__all__ = ["run_train_head", "run_train_tail", "run_assign_ids", "load_tokenizer", "assign_new_items",
           "tokenizer_config", "TokenizerConfig"]


@dataclass
class TokenizerConfig:
    """The `tokenizer:` section of params, checked."""

    method: str
    sizes: list[int]
    ext_sizes: list[int]
    latent_dim: int
    hidden_dims: list[int]
    beta: float
    lr: float
    batch_size: int
    epochs_head: int
    epochs_tail: int
    epochs_full: int
    reseed_every: int
    kmeans_iters: int
    threads: int
    tau: float
    min_len: int
    max_len: int
    smoothing: float
    popularity_weighted: bool
    warmup_epochs: int
    reestimate_every: int
    import_path: str
    seed: int
    collision_token: bool = False
    unique_head: bool = False
    stage2_items: str = "tail_and_cold"
    head_encoder: str = "head"
    tau_target: float | None = None   # tau: auto: target items per SID (over the catalog for Stage 1)
    import_unknown: str = "error"
    accelerator: str = "auto"         # Lightning accelerator of the RQ-VAE training

    @property
    def registration(self) -> TokenizerMethod:
        return get_method(self.method)

    @property
    def adaptive(self) -> bool:
        return self.registration.adaptive

    @property
    def two_stage(self) -> bool:
        return self.registration.two_stage


def tokenizer_config(params: dict) -> TokenizerConfig:
    """The run's `tokenizer:` section (checked once by the schema: components/runtime/config_schema.py
    typed_params) as the steps read it: layers beyond an adaptive method's L_max dropped (they could never be
    issued), fixed-length methods' lengths = their layers, `tau: auto` as its target items per SID."""
    t = typed_params(params).tokenizer
    s = t.sarq
    reg = get_method(t.method)
    sizes, ext = list(t.codebook_sizes), list(t.extension_sizes)
    if reg.adaptive:
        min_len, max_len = s.min_len, s.max_len
        sizes, ext = sizes[:max_len], ext[:max_len]
        tau, tau_target = (math.inf, float(s.target_items_per_sid)) if s.tau == "auto" else (parse_tau(s.tau), None)
    else:
        min_len = max_len = len(sizes)
        tau, tau_target = math.inf, None
    cfg = TokenizerConfig(
        method=t.method, sizes=sizes, ext_sizes=ext, latent_dim=t.latent_dim, hidden_dims=list(t.hidden_dims),
        beta=float(t.beta), lr=float(t.lr), batch_size=t.batch_size, epochs_head=t.epochs_head,
        epochs_tail=t.epochs_tail, epochs_full=t.epochs_full, reseed_every=t.dead_code_reseed_every,
        kmeans_iters=t.kmeans_iters, threads=t.threads, tau=tau, min_len=min_len, max_len=max_len,
        smoothing=float(s.smoothing), popularity_weighted=s.popularity_weighted, warmup_epochs=s.warmup_epochs,
        reestimate_every=s.reestimate_every, unique_head=s.unique_head and reg.adaptive,
        import_path=t.import_path, seed=typed_params(params).seed, collision_token=t.collision_token,
        stage2_items=t.stage2_items, head_encoder=t.head_encoder, tau_target=tau_target,
        import_unknown=t.import_unknown, accelerator=t.accelerator)
    if reg.check is not None:   # the method's own needs beyond its keys (e.g. import: a file to read)
        reg.hook("check")(cfg)
    return cfg


# ---- inputs --------------------------------------------------------------------------------

def load_catalog(params: dict) -> tuple[pd.DataFrame, np.ndarray]:
    """prepared/items.parquet and the row-aligned embeddings/items.npy, checked."""
    items_path, emb_path = out_path(params, "prepared", "items.parquet"), out_path(params, "embeddings", "items.npy")
    for path in (items_path, emb_path):
        if not path.exists():
            raise DataError(str(path), "not found (run the prepare and embed steps first)")
    items = read_frame(items_path)
    for col in ("item_id", "popularity", "group"):
        if col not in items.columns:
            raise DataError(str(items_path), "missing column", column=col)
    bad = ~items["group"].isin(("head", "tail", "cold"))
    if bad.any():
        raise DataError(str(items_path), "group must be head, tail or cold", column="group", rows=np.flatnonzero(bad))
    x = load_matrix(emb_path)
    if len(x) != len(items):
        raise DataError(str(emb_path), f"shape {x.shape} does not match {len(items)} items in {items_path}")
    if not np.isfinite(x).all():
        raise DataError(str(emb_path), "non-finite values", rows=np.flatnonzero(~np.isfinite(x).all(1)))
    return items.reset_index(drop=True), x


def _setup(cfg: TokenizerConfig) -> None:
    """Threads (small matmuls: 1 thread is fastest on a shared machine) and seeds."""
    threads = max(1, min(cfg.threads, os.cpu_count() or 1))
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)


# tokenizer keys that say where training runs, not what the SIDs are: left out of the SID version
PLACEMENT_KEYS = ("accelerator",)


def _version(params: dict, cfg: TokenizerConfig) -> str:
    """The method and a hash of the params its SIDs come from; other methods' own sections
    (TokenizerMethod.section) are left out, so adding a method's block to params.yaml keeps every
    other method's version."""
    others = tuple(name for name, m in methods().items() if m.section is not None and name != cfg.method)
    view = {**params, "tokenizer": {k: v for k, v in params["tokenizer"].items()
                                    if k not in PLACEMENT_KEYS + others}}
    return f"{cfg.method}-{params_hash(view, ('dataset', 'data', 'embed', 'seed', 'tokenizer'))}"


def train_spec(cfg: TokenizerConfig, epochs: int) -> TrainSpec:
    return TrainSpec(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, beta=cfg.beta,
                     reseed_every=cfg.reseed_every, seed=cfg.seed, kmeans_iters=cfg.kmeans_iters,
                     accelerator=cfg.accelerator)


def sarq_spec(cfg: TokenizerConfig, popularity: np.ndarray) -> SarqSpec:
    weights = popularity_weights(torch.as_tensor(popularity)) if cfg.popularity_weighted else None
    return SarqSpec(tau=cfg.tau, min_len=cfg.min_len, max_len=cfg.max_len, smoothing=cfg.smoothing,
                    warmup_epochs=cfg.warmup_epochs, reestimate_every=cfg.reestimate_every, weights=weights,
                    target_items_per_sid=cfg.tau_target)


def make_tokenizer(cfg: TokenizerConfig, model: RQVAE | None, quantizer: ResidualQuantizer, version: str,
                   table=None, anchor_sizes: list[int] | None = None, tau: float | None = None) -> Tokenizer:
    """tau: the one training chose (`tau: auto`), else the configured one."""
    tau = cfg.tau if tau is None else tau
    return Tokenizer(cfg.method, quantizer, model, table, tau, cfg.min_len, cfg.max_len, version,
                     list(anchor_sizes if anchor_sizes is not None else quantizer.sizes))


# ---- the hooks' context: what a registered method's hooks read and fill ---------------------

@dataclass
class HeadRun:
    """train_head's context: the hook writes its checkpoint into `ckpt` (saved as tokenizer/head.pt;
    `tokenizer`: a Tokenizer.state() that assign_ids encodes with) and its numbers into `summary`."""

    params: dict
    cfg: TokenizerConfig
    items: pd.DataFrame
    x: np.ndarray
    version: str
    ckpt: dict
    summary: dict


@dataclass
class TailRun:
    """train_tail's context (a two-stage method): `head` is tokenizer/head.pt; the hook saves
    tokenizer/tail.pt and returns the step's summary."""

    params: dict
    cfg: TokenizerConfig
    head: dict
    start: float


@dataclass
class AssignRun:
    """assign_ids's context for a method with its own assign_ids hook."""

    params: dict
    cfg: TokenizerConfig
    head: dict
    items: pd.DataFrame
    x: np.ndarray
    item_ids: list[str]
    table_path: str


@dataclass
class Assigned:
    """What assign_ids writes: the SID table (its version column set later), meta.json (likewise),
    per-item reconstruction errors and per-layer residual distances (None where there is no model)."""

    table: pd.DataFrame
    meta: dict
    recon: np.ndarray | None = None
    residual: dict | None = None


# ---- train_head ------------------------------------------------------------------------------

def small_head_warning(n_head: int, sizes: list[int], head_encoder: str = "head") -> str | None:
    """One line when Stage 1 has too few head items for its codebooks, else None.

    Small: fewer than 2 head items per first-layer row, or fewer than the last layer's rows
    (the deeper anchors are then fitted on near-zero residuals and the encoder on a handful
    of texts; climate-fever's 62 head items against 64/128/192 rows)."""
    if n_head >= 2 * sizes[0] and n_head >= sizes[-1]:
        return None
    todo = ("tokenizer.head_encoder is all already; use" if head_encoder == "all"
            else "set tokenizer.head_encoder: all, or use")
    return (f"small head: {n_head} head items for tokenizer.codebook_sizes {sizes} (want >= {2 * sizes[0]} = "
            f"2 x first layer and >= {sizes[-1]} = last layer); Stage 1 may generalise poorly to tail and "
            f"cold items: {todo} fewer codes or a larger data.head_share")


def run_train_head(params: dict) -> dict:
    """Stage 1 (or the only stage): writes tokenizer/head.pt."""
    cfg = tokenizer_config(params)
    _setup(cfg)
    items, x = load_catalog(params)
    version = _version(params, cfg)
    start = time.perf_counter()
    ckpt: dict = {"format": FORMAT, "method": cfg.method, "version": version, "tokenizer": None}
    summary: dict = {"method": cfg.method}
    cfg.registration.hook("train_head")(HeadRun(params, cfg, items, x, version, ckpt, summary))
    save_checkpoint(ckpt, out_path(params, "tokenizer", "head.pt"))
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    return summary


# ---- train_tail ------------------------------------------------------------------------------

def _load_head(params: dict, cfg: TokenizerConfig) -> dict:
    head = load_checkpoint(out_path(params, "tokenizer", "head.pt"))
    if head.get("method") != cfg.method:
        raise ConfigError("tokenizer.method", f"tokenizer/head.pt was trained with {head.get('method')!r}, "
                                              f"params ask for {cfg.method!r}: run train_head again")
    return head


def run_train_tail(params: dict) -> dict:
    """Stage 2 of a two-stage method (its train_tail hook); for the one-stage methods it writes a marker
    tokenizer/tail.pt so the pipeline stays uniform."""
    cfg = tokenizer_config(params)
    _setup(cfg)
    head = _load_head(params, cfg)
    start = time.perf_counter()
    if not cfg.two_stage:
        save_checkpoint({"format": FORMAT, "method": cfg.method, "stage2": False, "version": head["version"],
                         "tokenizer": None},
                        out_path(params, "tokenizer", "tail.pt"))
        return {"method": cfg.method, "stage2": False}
    return cfg.registration.hook("train_tail")(TailRun(params, cfg, head, start))


# ---- assign_ids ------------------------------------------------------------------------------

def _issued_head(head: dict, item_ids: list[str], codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Put the Stage-1 SIDs of head items back into (codes, lengths); returns their mask."""
    issued = head["issued"]
    pos = {i: k for k, i in enumerate(item_ids)}
    rows = np.array([pos[i] for i in issued["item_ids"] if i in pos], dtype=np.int64)
    keep = np.array([i in pos for i in issued["item_ids"]], dtype=bool)
    codes[rows] = issued["codes"].numpy()[keep]
    lengths[rows] = issued["lengths"].numpy()[keep]
    mask = np.zeros(len(item_ids), dtype=bool)
    mask[rows] = True
    return mask


def _with_collision_layer(codes_list: list[list[int]], popularity: np.ndarray,
                          meta: dict) -> tuple[list[list[int]], dict]:
    """TIGER's collision token as one more layer (components.tokenizers.sid_table.collision_codes):
    every SID grows by one code, and meta by one layer sized for the largest collision group,
    so the retriever's vocabulary and max_len follow from meta alone."""
    extra = collision_codes(codes_list, popularity)
    size = collision_layer_size(extra)
    meta = {**meta, "codebook_sizes": [*meta["codebook_sizes"], size], "anchor_sizes": [*meta["anchor_sizes"], size],
            "max_len": meta["max_len"] + 1, "min_len": meta["min_len"] + 1}
    return [c + [k] for c, k in zip(codes_list, extra)], meta


def _assign_with_tokenizer(params: dict, cfg: TokenizerConfig, head: dict, items: pd.DataFrame, x: np.ndarray,
                           item_ids: list[str], table_path: str) -> Assigned:
    """Every item's SID from the frozen tokenizer (tail.pt, else head.pt); a two-stage method's head
    items keep the SIDs Stage 1 issued."""
    tok = load_tokenizer(params)
    codes, lengths = tok.assign(x)
    stages = np.array(["full"] * len(items), dtype=object)
    if cfg.two_stage:
        is_head = _issued_head(head, item_ids, codes, lengths)
        stages[:] = "tail"
        stages[is_head] = "head"
    elif cfg.unique_head:  # one-stage SARQ: the head group's SIDs are made distinct here
        is_head = (items["group"] == "head").to_numpy()
        lengths[is_head] = unique_floor(codes[is_head], lengths[is_head], cfg.max_len)
    recon = tok.reconstruction_error(x, codes, lengths)
    codes_list = [codes[i, : lengths[i]].tolist() for i in range(len(items))]
    meta = {"method": cfg.method, "codebook_sizes": tok.sizes, "anchor_sizes": tok.anchor_sizes,
            "max_len": tok.max_len, "min_len": tok.min_len,
            "tau": tok.tau if math.isfinite(tok.tau) else None, "collision_token": cfg.collision_token}
    if head.get("small_head_warning"):
        meta["small_head_warning"] = head["small_head_warning"]
    if cfg.collision_token:
        codes_list, meta = _with_collision_layer(codes_list, items["popularity"].to_numpy(), meta)
    table = make_sid_table(item_ids, codes_list, stages.tolist(), tok.version)
    if cfg.two_stage:  # the head rows above are the registry; check it still holds
        assert_issued_reencode(tok, head["issued"], item_ids, x, cfg.unique_head, table_path)
    dist = tok.residual_distances(x)
    residual = {f"layer{l + 1}": {"q50": float(np.quantile(dist[:, l], 0.5)),
                                  "q99": float(np.quantile(dist[:, l], 0.99))} for l in range(dist.shape[1])}
    return Assigned(table, meta, recon, residual)


def run_assign_ids(params: dict) -> dict:
    """Write sids/sid_table.parquet, sids/meta.json, metrics/sid_stats.json and the plots."""
    cfg = tokenizer_config(params)
    _setup(cfg)
    head = _load_head(params, cfg)
    items, x = load_catalog(params)
    item_ids = items["item_id"].astype(str).tolist()
    table_path = out_path(params, "sids", "sid_table.parquet")
    hook = cfg.registration.hook("assign_ids")
    if hook is not None:
        assigned = hook(AssignRun(params, cfg, head, items, x, item_ids, str(table_path)))
    else:
        assigned = _assign_with_tokenizer(params, cfg, head, items, x, item_ids, str(table_path))
    table, meta = assigned.table, assigned.meta
    # the SIDs' own version (sid_table.sid_version), not the params hash the tokenizer files carry
    tokenizer_files = [f for f in (out_path(params, "tokenizer", "head.pt"), out_path(params, "tokenizer", "tail.pt"))
                       if f.exists()]
    table["version"] = meta["version"] = sid_version(cfg.method, table, meta, tokenizer_files)
    write_sid_table(table, table_path)
    write_json(meta, out_path(params, "sids", "meta.json"))
    stats = sid_statistics(table, items, meta, assigned.recon)
    if assigned.residual is not None:
        stats["residual_distance"] = assigned.residual
    write_json(stats, out_path(params, "metrics", "sid_stats.json"))
    plot_sid_stats(table, items, out_path(params, "plots", "sid_lengths.png"),
                   out_path(params, "plots", "items_per_sid.png"))
    return {"method": cfg.method, "n_items": stats["n_items"], "n_sids": stats["n_sids"],
            "unique_share": stats["unique_share"], "items_per_sid_mean": stats["items_per_sid"]["mean"],
            "mean_length": {g: stats["length"][g]["mean"] for g in ("head", "tail", "cold")}}

"""The tokenizer steps: train_head -> tokenizer/head.pt, train_tail -> tokenizer/tail.pt,
assign_ids -> sids/ + metrics/sid_stats.json + plots. Behaviour comes from params alone.

| method   | train_head                          | train_tail                              | length   |
|----------|-------------------------------------|-----------------------------------------|----------|
| rqkmeans | layer-wise k-means, all items       | nothing (writes a marker file)          | fixed    |
| rqvae    | RQ-VAE, all items                   | nothing                                 | fixed    |
| sarq     | RQ-VAE + SARQ, all items            | nothing                                 | adaptive |
| acrq     | RQ-VAE on head, curriculum sizes    | anchors + extensions on tail (and cold) | fixed    |
| sa2crq   | acrq Stage 1 + SARQ on head         | acrq Stage 2 + frozen head path table   | adaptive |
| import   | reads and checks tokenizer.import_path | nothing                              | as given |

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
import warnings
from dataclasses import dataclass

import faiss
import numpy as np
import pandas as pd
import torch

from components.runtime.atomic import write_json
from components.runtime.config import params_hash
from components.runtime.errors import ConfigError, DataError
from components.runtime.paths import out_path
from components.runtime.safe_load import load_matrix, read_frame
from components.runtime.train_loggers import finish, training_loggers
from components.tokenizers.acrq import anchored_model, check_curriculum, check_extensions
from components.tokenizers.quantizer import ResidualQuantizer
from components.tokenizers.rq_kmeans import fit_rq_kmeans
from components.tokenizers.rqvae import RQVAE, SarqSpec, TrainSpec, fit
from components.tokenizers.sarq import parse_tau, popularity_weights, unique_floor
from components.tokenizers.sid_stats import plot_sid_stats, sid_statistics
from components.tokenizers.sid_table import (
    IMPORT_UNKNOWN,
    assert_issued_reencode,
    collision_codes,
    collision_layer_size,
    make_sid_table,
    read_import,
    sid_version,
    write_sid_table,
)
from components.tokenizers.sid_tokenizer import (
    STAGE2_METHODS,
    Tokenizer,
    assign_new_items,
    load_checkpoint,
    load_tokenizer,
    save_checkpoint,
)

METHODS = ("rqkmeans", "rqvae", "acrq", "sarq", "sa2crq", "import")
SARQ_METHODS = ("sarq", "sa2crq")
COLLISION_METHODS = ("rqkmeans", "rqvae")
STAGE2_ITEMS = ("tail_and_cold", "tail")
HEAD_ENCODERS = ("head", "all")
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
    def adaptive(self) -> bool:
        return self.method in SARQ_METHODS


def _int_list(value: object, key: str) -> list[int]:
    if not isinstance(value, list) or not value or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ConfigError(key, f"must be a non-empty list of integers, got {value!r}")
    return list(value)


def _collision_flag(value: object, method: str) -> bool:
    """tokenizer.collision_token, checked: TIGER's extra token makes sense only where every
    SID has the same length (rqvae, rqkmeans); for adaptive or imported SIDs a fixed extra
    layer would mix with the variable length, so it is refused rather than ignored."""
    if not isinstance(value, bool):
        raise ConfigError("tokenizer.collision_token", f"must be true or false, got {value!r}")
    if value and method not in COLLISION_METHODS:
        raise ConfigError("tokenizer.collision_token",
                          f"only for fixed-length methods {COLLISION_METHODS}, not tokenizer.method={method}")
    return value


def _unique_head_flag(value: object, method: str) -> bool:
    """tokenizer.sarq.unique_head: only adaptive methods have lengths to raise."""
    if not isinstance(value, bool):
        raise ConfigError("tokenizer.sarq.unique_head", f"must be true or false, got {value!r}")
    return value and method in SARQ_METHODS


def _choice(value: object, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(key, f"must be one of {choices}, got {value!r}")
    return str(value)


def _tau(sarq: dict) -> tuple[float, float | None]:
    """(tau, target items per SID): a number, or 'auto' with tokenizer.sarq.target_items_per_sid
    (tau is then chosen at each path-table estimation; the initial tau is never read)."""
    if sarq.get("tau") != "auto":
        return parse_tau(sarq.get("tau")), None
    target = sarq.get("target_items_per_sid", 1.5)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 1.0 <= target < math.inf:
        raise ConfigError("tokenizer.sarq.target_items_per_sid", f"must be a number >= 1, got {target!r}")
    return math.inf, float(target)


def tokenizer_config(params: dict) -> TokenizerConfig:
    """Read and check params['tokenizer']; ConfigError names the offending key."""
    t = params.get("tokenizer") or {}
    s = t.get("sarq") or {}
    method = t.get("method")
    if method not in METHODS:
        raise ConfigError("tokenizer.method", f"must be one of {METHODS}, got {method!r}")
    sizes = _int_list(t.get("codebook_sizes"), "tokenizer.codebook_sizes")
    if any(k < 1 for k in sizes):
        raise ConfigError("tokenizer.codebook_sizes", f"sizes must be >= 1, got {sizes}")
    ext = _int_list(t.get("extension_sizes", [0] * len(sizes)), "tokenizer.extension_sizes")
    min_len, max_len = int(s.get("min_len", 1)), int(s.get("max_len", len(sizes)))
    if method in SARQ_METHODS:
        if not 1 <= min_len <= max_len:
            raise ConfigError("tokenizer.sarq.min_len", f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
        if max_len > len(sizes):
            raise ConfigError("tokenizer.sarq.max_len",
                              f"{max_len} exceeds the number of layers in tokenizer.codebook_sizes ({len(sizes)})")
        # layers beyond L_max could never be issued: they are not built
        sizes, ext = sizes[:max_len], ext[:max_len]
    else:
        min_len = max_len = len(sizes)
    if method in STAGE2_METHODS:
        check_curriculum(sizes)
        check_extensions(ext, len(sizes))
    tau, tau_target = (_tau(s) if method in SARQ_METHODS else (math.inf, None))
    cfg = TokenizerConfig(
        method=method, sizes=sizes, ext_sizes=ext, latent_dim=int(t.get("latent_dim", 64)),
        hidden_dims=[int(h) for h in t.get("hidden_dims", [])], beta=float(t.get("beta", 0.25)),
        lr=float(t.get("lr", 1e-3)), batch_size=int(t.get("batch_size", 256)),
        epochs_head=int(t.get("epochs_head", 0)), epochs_tail=int(t.get("epochs_tail", 0)),
        epochs_full=int(t.get("epochs_full", 0)), reseed_every=int(t.get("dead_code_reseed_every", 0)),
        kmeans_iters=int(t.get("kmeans_iters", 20)), threads=int(t.get("threads", 1)), tau=tau,
        min_len=min_len, max_len=max_len, smoothing=float(s.get("smoothing", 1.0)),
        popularity_weighted=bool(s.get("popularity_weighted", False)),
        warmup_epochs=int(s.get("warmup_epochs", 0)), reestimate_every=int(s.get("reestimate_every", 1)),
        unique_head=_unique_head_flag(s.get("unique_head", False), method),
        import_path=str(t.get("import_path") or ""), seed=int(params.get("seed", 0)),
        collision_token=_collision_flag(t.get("collision_token", False), method),
        stage2_items=_choice(t.get("stage2_items", "tail_and_cold"), "tokenizer.stage2_items", STAGE2_ITEMS),
        head_encoder=_choice(t.get("head_encoder", "head"), "tokenizer.head_encoder", HEAD_ENCODERS),
        tau_target=tau_target,
        import_unknown=_choice(t.get("import_unknown", "error"), "tokenizer.import_unknown", IMPORT_UNKNOWN),
        accelerator=str(t.get("accelerator", "auto")))
    if cfg.method in SARQ_METHODS and cfg.smoothing <= 0:
        raise ConfigError("tokenizer.sarq.smoothing", f"must be > 0, got {cfg.smoothing}")
    for key, value in (("batch_size", cfg.batch_size), ("latent_dim", cfg.latent_dim), ("threads", cfg.threads)):
        if value < 1:
            raise ConfigError(f"tokenizer.{key}", f"must be >= 1, got {value}")
    if cfg.method == "import" and not cfg.import_path:
        raise ConfigError("tokenizer.import_path", "tokenizer.method=import needs a JSON or parquet file")
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
    view = {**params, "tokenizer": {k: v for k, v in params["tokenizer"].items() if k not in PLACEMENT_KEYS}}
    return f"{cfg.method}-{params_hash(view, ('dataset', 'data', 'embed', 'seed', 'tokenizer'))}"


def _train_spec(cfg: TokenizerConfig, epochs: int) -> TrainSpec:
    return TrainSpec(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, beta=cfg.beta,
                     reseed_every=cfg.reseed_every, seed=cfg.seed, kmeans_iters=cfg.kmeans_iters,
                     accelerator=cfg.accelerator)


def _sarq_spec(cfg: TokenizerConfig, popularity: np.ndarray) -> SarqSpec:
    weights = popularity_weights(torch.as_tensor(popularity)) if cfg.popularity_weighted else None
    return SarqSpec(tau=cfg.tau, min_len=cfg.min_len, max_len=cfg.max_len, smoothing=cfg.smoothing,
                    warmup_epochs=cfg.warmup_epochs, reestimate_every=cfg.reestimate_every, weights=weights,
                    target_items_per_sid=cfg.tau_target)


def _tokenizer(cfg: TokenizerConfig, model: RQVAE | None, quantizer: ResidualQuantizer, version: str,
               table=None, anchor_sizes: list[int] | None = None, tau: float | None = None) -> Tokenizer:
    """tau: the one training chose (`tau: auto`), else the configured one."""
    tau = cfg.tau if tau is None else tau
    return Tokenizer(cfg.method, quantizer, model, table, tau, cfg.min_len, cfg.max_len, version,
                     list(anchor_sizes if anchor_sizes is not None else quantizer.sizes))


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
    if cfg.method == "import":
        codes = read_import(cfg.import_path, items["item_id"].astype(str).tolist(), cfg.import_unknown)
        ckpt["import"] = {"file": cfg.import_path, "item_ids": items["item_id"].astype(str).tolist(), "codes": codes}
        summary["n_items"] = len(codes)
    elif cfg.method == "rqkmeans":
        quantizer = fit_rq_kmeans(x, cfg.sizes, cfg.seed, cfg.kmeans_iters)
        ckpt["tokenizer"] = _tokenizer(cfg, None, quantizer, version).state()
        summary["n_train"] = len(x)
    else:
        stage1 = cfg.method in STAGE2_METHODS
        train = (items["group"] == "head").to_numpy() if stage1 else np.ones(len(items), dtype=bool)
        if not train.any():
            raise DataError(str(out_path(params, "prepared", "items.parquet")),
                            f"no head items: tokenizer.method={cfg.method} trains Stage 1 on head items", column="group")
        small = small_head_warning(int(train.sum()), cfg.sizes, cfg.head_encoder) if stage1 else None
        if small:
            warnings.warn(small)
            ckpt["small_head_warning"] = summary["small_head_warning"] = small
        model = RQVAE(x.shape[1], cfg.hidden_dims, cfg.latent_dim, ResidualQuantizer(cfg.sizes, cfg.latent_dim))
        sarq = _sarq_spec(cfg, items["popularity"].to_numpy()[train]) if cfg.adaptive else None
        if sarq is not None and stage1:  # tau: auto meets its target over the whole catalog
            sarq.tau_items = torch.from_numpy(x)
        spec = _train_spec(cfg, cfg.epochs_head if stage1 else cfg.epochs_full)
        # head_encoder=all: encoder and decoder also reconstruct every item; codebooks stay head-only
        recon_x = torch.from_numpy(x) if stage1 and cfg.head_encoder == "all" else None
        loggers = training_loggers(params, "train_head", {"tokenizer": params["tokenizer"]})
        summary["train"] = fit(model, torch.from_numpy(x[train]), spec, sarq, init_kmeans=True,
                               recon_x=recon_x, loggers=loggers)
        finish(loggers)
        summary["n_train"] = int(train.sum())
        if recon_x is not None:
            summary["n_recon"] = len(recon_x)
        tok = _tokenizer(cfg, model, model.quantizer, version, table=model.table,
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
    """Stage 2 for ACRQ / SA2CRQ (anchors + extensions on tail items, and cold items unless
    tokenizer.stage2_items is tail); for the one-stage methods it writes a marker
    tokenizer/tail.pt so the pipeline stays uniform. Items left out get their SIDs from the
    frozen result in assign_ids, like every item."""
    cfg = tokenizer_config(params)
    _setup(cfg)
    head = _load_head(params, cfg)
    start = time.perf_counter()
    if cfg.method not in STAGE2_METHODS:
        save_checkpoint({"format": FORMAT, "method": cfg.method, "stage2": False, "version": head["version"],
                         "tokenizer": None},
                        out_path(params, "tokenizer", "tail.pt"))
        return {"method": cfg.method, "stage2": False}
    items, x = load_catalog(params)
    stage1 = Tokenizer.from_state(head["tokenizer"])
    model = anchored_model(stage1.model, cfg.ext_sizes)
    groups = ("tail",) if cfg.stage2_items == "tail" else ("tail", "cold")
    train = items["group"].isin(groups).to_numpy()
    sarq = None
    if cfg.adaptive:
        sarq = SarqSpec(tau=stage1.tau, min_len=cfg.min_len, max_len=cfg.max_len, smoothing=cfg.smoothing,
                        frozen_table=stage1.table)
    spec = _train_spec(cfg, cfg.epochs_tail)
    loggers = training_loggers(params, "train_tail", {"tokenizer": params["tokenizer"]})
    result = fit(model, torch.from_numpy(x[train]), spec, sarq, init_kmeans=True, loggers=loggers)
    finish(loggers)
    tok = _tokenizer(cfg, model, model.quantizer, head["version"], table=stage1.table,
                     anchor_sizes=model.quantizer.anchor_sizes, tau=stage1.tau)
    save_checkpoint({"format": FORMAT, "method": cfg.method, "stage2": True, "version": head["version"],
                     "tokenizer": tok.state(), "history": spec.history}, out_path(params, "tokenizer", "tail.pt"))
    return {"method": cfg.method, "stage2": True, "n_train": int(train.sum()), "stage2_items": cfg.stage2_items,
            "train": result,
            "codebook_sizes": model.quantizer.sizes, "wall_s": round(time.perf_counter() - start, 2)}


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


def run_assign_ids(params: dict) -> dict:
    """Write sids/sid_table.parquet, sids/meta.json, metrics/sid_stats.json and the plots."""
    cfg = tokenizer_config(params)
    _setup(cfg)
    head = _load_head(params, cfg)
    items, x = load_catalog(params)
    item_ids = items["item_id"].astype(str).tolist()
    table_path = out_path(params, "sids", "sid_table.parquet")
    recon = None
    if cfg.method == "import":
        imported = dict(zip(head["import"]["item_ids"], head["import"]["codes"]))
        missing = [i for i in item_ids if i not in imported]
        if missing:
            raise DataError(cfg.import_path, f"{len(missing)} catalog items have no SID, e.g. {missing[:5]} "
                                             "(the catalog changed since train_head)", column="item_id")
        codes_list = [imported[i] for i in item_ids]
        table = make_sid_table(item_ids, codes_list, "import", head["version"])
        sizes = [int(max((c[l] for c in codes_list if len(c) > l), default=-1)) + 1
                 for l in range(max(map(len, codes_list)))]
        meta = {"method": "import", "codebook_sizes": sizes, "anchor_sizes": sizes,
                "max_len": len(sizes), "min_len": int(min(map(len, codes_list))), "tau": None,
                "collision_token": False}
        residual = None
    else:
        tok = load_tokenizer(params)
        codes, lengths = tok.assign(x)
        stages = np.array(["full"] * len(items), dtype=object)
        if cfg.method in STAGE2_METHODS:
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
        if cfg.method in STAGE2_METHODS:  # the head rows above are the registry; check it still holds
            assert_issued_reencode(tok, head["issued"], item_ids, x, cfg.unique_head, str(table_path))
        dist = tok.residual_distances(x)
        residual = {f"layer{l + 1}": {"q50": float(np.quantile(dist[:, l], 0.5)),
                                      "q99": float(np.quantile(dist[:, l], 0.99))} for l in range(dist.shape[1])}
    # the SIDs' own version (sid_table.sid_version), not the params hash the tokenizer files carry
    tokenizer_files = [f for f in (out_path(params, "tokenizer", "head.pt"), out_path(params, "tokenizer", "tail.pt"))
                       if f.exists()]
    table["version"] = meta["version"] = sid_version(cfg.method, table, meta, tokenizer_files)
    write_sid_table(table, table_path)
    write_json(meta, out_path(params, "sids", "meta.json"))
    stats = sid_statistics(table, items, meta, recon)
    if residual is not None:
        stats["residual_distance"] = residual
    write_json(stats, out_path(params, "metrics", "sid_stats.json"))
    plot_sid_stats(table, items, out_path(params, "plots", "sid_lengths.png"),
                   out_path(params, "plots", "items_per_sid.png"))
    return {"method": cfg.method, "n_items": stats["n_items"], "n_sids": stats["n_sids"],
            "unique_share": stats["unique_share"], "items_per_sid_mean": stats["items_per_sid"]["mean"],
            "mean_length": {g: stats["length"][g]["mean"] for g in ("head", "tail", "cold")}}

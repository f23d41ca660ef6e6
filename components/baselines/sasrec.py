"""SASRec rows of the evaluation (`SASRec`, `SASRec + text`) with cornac 3.0.1's own model and training loop.

Why cornac: an outside, standard sequential recommender as the anchor a user would pick instead
of a generative retriever (../shared/docs/REFERENCE-FIGURES.md). `cornac.models.SASRec.fit` trains
as published; only three things are ours:
- the data: the train split's (history, target) pairs chained back into one sequence per user
  (`train_sessions`), handed over as `SequentialDataset.build(fmt="USIT")` with one session per
  user, position as timestamp and identity item ids (row in items.parquet), so every item,
  cold ones included, has a row and cornac's prefixes are exactly the train pairs;
- the checkpoint: cornac's best-on-validation hook (`val_score`) is pointed at our valid split
  (full ranking over all items, our recall / NDCG at eval.headline_k), with patience; the best
  (dropout, epoch) over `eval.sasrec.dropout` wins;
- `SASRec + text`: item embedding = cornac's id embedding + a learned linear projection of the
  item's frozen MiniLM vector, used for the input sequence and for scoring alike.
Test scores cover every item (history items stay unless eval.exclude_history), so the rows rank
the same queries as the other baselines. A fit is kept per process (`fitted_sasrec`, keyed by its settings,
seed and data), so `SASRec + text + fusion` (components/baselines/sasrec_fusion.py) reuses `SASRec + text`'s.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import sys
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import numpy as np
import pandas as pd

from components.baselines.registry import baseline_label
from components.ranking.metrics import per_query_metrics, target_pairs, target_ranks
from components.ranking.ranked import ranked_frame, top_k
from components.runtime.config_schema import typed_params
from components.runtime.errors import ConfigError, DataError

log = logging.getLogger("sa2crq.sasrec")


def sasrec_config(params: dict) -> dict:
    """eval.sasrec (checked once by the schema) as the runner reads it: dropout as the list of values tried."""
    cfg = typed_params(params).eval.sasrec.model_dump()
    cfg["dropout"] = [float(d) for d in (cfg["dropout"] if isinstance(cfg["dropout"], list) else [cfg["dropout"]])]
    return cfg


# --------------------------------------------------------------------------- data
def history_queries(queries: pd.DataFrame) -> pd.DataFrame:
    """The queries with a history (SASRec has nothing to read in a text-only query)."""
    return queries[queries["history"].map(len) > 0]


def _rows_of(ids, rows: dict[str, int], label) -> list[int]:
    missing = [i for i in ids if i not in rows]
    if missing:
        raise DataError("prepared/queries.parquet", f"item {missing[0]!r} is not in prepared/items.parquet",
                        column="history", rows=[label])
    return [rows[i] for i in ids]


def train_sessions(train: pd.DataFrame, rows: dict[str, int], max_history: int) -> list[list[int]]:
    """One item-row sequence per user, chained back from the train split's (history, target) pairs.

    A pair continues another when its history is the other's history + target cut to the last
    `max_history` items (how prepare writes consecutive queries of one user), so the chain is the
    user's whole training sequence and each training interaction counts once. Pairs of a query
    with several targets stand alone (history + that target).
    """
    train = history_queries(train).sort_values("order", kind="stable")
    hists: list[tuple[int, ...]] = []
    tails: list[int] = []
    for label, hist, targets in zip(train.index, train["history"], train["targets"]):
        h = tuple(_rows_of(list(hist), rows, label))
        for t in _rows_of(list(targets), rows, label):
            hists.append(h)
            tails.append(t)
    n_targets = train["targets"].map(len).to_numpy(dtype=np.int64)
    single = np.repeat(n_targets == 1, n_targets)
    by_hist: dict[tuple[int, ...], list[int]] = {}
    for n, h in enumerate(hists):
        if single[n]:
            by_hist.setdefault(h, []).append(n)
    nxt, claimed = np.full(len(hists), -1), np.zeros(len(hists), dtype=bool)
    for n in range(len(hists)):
        if not single[n]:
            continue
        for c in by_hist.get((hists[n] + (tails[n],))[-max_history:], []):
            if c > n and not claimed[c]:  # later in time order, not yet someone's successor
                nxt[n], claimed[c] = c, True
                break
    sessions = []
    for n in np.flatnonzero(~claimed):
        seq = list(hists[n])
        while n >= 0:
            seq.append(tails[n])
            n = nxt[n]
        sessions.append(seq)
    return sessions


def cornac_train_set(sessions: list[list[int]], n_items: int, seed: int):
    """cornac SequentialDataset: one user = one session, position = timestamp, item id = item row."""
    from cornac.data import SequentialDataset

    data = [(s, s, item, t) for s, seq in enumerate(sessions) for t, item in enumerate(seq)]
    iid_map = OrderedDict((i, i) for i in range(n_items))  # identity map: every item known, cold ones too
    return SequentialDataset.build(data, fmt="USIT", global_iid_map=iid_map, seed=seed)


def padded(queries: pd.DataFrame, rows: dict[str, int], max_len: int, pad: int) -> np.ndarray:
    """Last `max_len` history rows per query, left-padded with `pad` (cornac's `score` layout)."""
    out = np.full((len(queries), max_len), pad, dtype=np.int64)
    for pos, (label, hist) in enumerate(zip(queries.index, queries["history"])):
        tail = _rows_of(list(hist)[-max_len:], rows, label)
        if tail:
            out[pos, max_len - len(tail):] = tail
    return out


def history_mask(seqs: np.ndarray, n_items: int) -> np.ndarray:
    """True at (query, item) when the item is in the query's (padded) history."""
    mask = np.zeros((len(seqs), n_items + 1), dtype=bool)
    mask[np.arange(len(seqs))[:, None], seqs] = True
    return mask[:, :n_items]


# --------------------------------------------------------------------------- model
def scores(net, seqs: np.ndarray) -> np.ndarray:
    """Scores of every item for a batch of padded sequences (cornac's `predict`, batched)."""
    import torch

    net.eval()
    with torch.no_grad():
        out = net.predict(None, torch.as_tensor(seqs, dtype=torch.long))
    return np.asarray(out, dtype=np.float32).reshape(len(seqs), -1)


def search(net, seqs: np.ndarray, k: int, exclude: bool, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-k item rows and scores per sequence over all items (history items dropped when `exclude`)."""
    idx, vals = [], []
    for start in range(0, len(seqs), chunk):
        block = seqs[start:start + chunk]
        s = scores(net, block)
        if exclude:
            s[history_mask(block, s.shape[1])] = -np.inf
        i, v = top_k(s, k)
        idx.append(i)
        vals.append(v)
    return np.concatenate(idx), np.concatenate(vals)


def text_model_class(text: np.ndarray) -> type:
    """cornac's SASRecModel whose item embedding is id embedding + Linear(text), for input and scoring."""
    import torch
    from cornac.models.sasrec.sasrec import SASRecModel
    from torch import nn

    class TextItemEmbedding(nn.Module):
        def __init__(self, ids: nn.Embedding, std: float):
            super().__init__()
            self.ids, self.embedding_dim = ids, ids.embedding_dim
            pad_row = torch.zeros(1, text.shape[1])  # the padding row sees no text
            self.register_buffer("text", torch.cat([torch.as_tensor(text, dtype=torch.float32), pad_row]))
            self.proj = nn.Linear(text.shape[1], ids.embedding_dim, bias=False)
            nn.init.normal_(self.proj.weight, std=std)

        def forward(self, idx):
            return self.ids(idx) + self.proj(self.text[idx])

    class SASRecTextModel(SASRecModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.item_emb = TextItemEmbedding(self.item_emb, self.init_std).to(self.dev)

    return SASRecTextModel


class StopTraining(Exception):
    """Raised from the validation hook when patience runs out (cornac's loop has no early stop)."""


@dataclass
class Validator:
    """cornac's `val_score` replacement: our metric on the valid split, best state kept, patience.

    `score_fn(net) -> {"recall": .., "ndcg": ..}`; called every `eval_every` epochs by cornac.
    """

    score_fn: Callable[[Any], dict]
    metric: str
    eval_every: int
    patience: int
    tag: str = ""
    curve: list[dict] = field(default_factory=list)
    best: float = -np.inf
    best_epoch: int = 0
    best_state: dict | None = None

    def __call__(self, model, *_args, **_kwargs) -> float:
        val = self.score_fn(model.model)
        epoch = (len(self.curve) + 1) * self.eval_every
        self.curve.append({"epoch": epoch, **val})
        log.info("%s epoch %d: valid %s", self.tag, epoch, {k: round(v, 4) for k, v in val.items()})
        if val[self.metric] > self.best:
            self.best, self.best_epoch = val[self.metric], epoch
            self.best_state = copy.deepcopy(model.model.state_dict())
        elif self.patience and epoch - self.best_epoch >= self.patience * self.eval_every:
            raise StopTraining
        return val[self.metric]


@contextmanager
def cornac_hooks(validator: Validator, model_cls: type | None) -> Iterator[None]:
    """Point cornac's SASRec.fit at our validation (and the text model) for the time of one fit.

    fit imports its network class (`from .sasrec import SASRecModel`) when it runs; the text model
    is offered there by a stand-in module in sys.modules. The real module stays untouched, since
    cornac's own `SASRecModel.__init__` looks its class up by that global name.
    """
    from cornac.models.sasrec import recom_sasrec, sasrec

    name, real = sasrec.__name__, sys.modules[sasrec.__name__]
    if model_cls is not None:
        stand_in = types.ModuleType(name)
        stand_in.SASRecModel = model_cls
        sys.modules[name] = stand_in
    try:
        with mock.patch.object(recom_sasrec, "val_score", validator):
            yield
    finally:
        sys.modules[name] = real


@dataclass
class SASRecRun:
    """The chosen checkpoint and how it was found."""

    net: Any
    dropout: float
    epoch: int
    val: dict
    curves: dict[float, list[dict]]
    seconds: float


def fit_sasrec(train_set, val_fn: Callable[[Any], dict], cfg: dict, seed: int, text: np.ndarray | None,
               metric: str) -> SASRecRun:
    """cornac SASRec.fit per dropout with best-on-validation checkpoints; the best (dropout, epoch) wins."""
    from cornac.models import SASRec

    start = time.perf_counter()
    model_cls = text_model_class(text) if text is not None else None
    best: tuple[float, float, Validator, Any] | None = None
    curves: dict[float, list[dict]] = {}
    for dropout in cfg["dropout"]:
        model = SASRec(embedding_dim=cfg["dim"], loss=cfg["loss"], batch_size=cfg["batch_size"], learning_rate=cfg["lr"],
                       n_sample=cfg["num_neg"], sample_alpha=cfg["neg_alpha"], n_epochs=cfg["epochs"],
                       max_len=cfg["max_len"], num_blocks=cfg["blocks"], num_heads=cfg["heads"], dropout=dropout,
                       seed=seed, model_selection="best", val_eval_every=cfg["eval_every"])
        validator = Validator(val_fn, metric, cfg["eval_every"], cfg["patience"], tag=f"dropout {dropout}")
        with cornac_hooks(validator, model_cls):
            try:
                model.fit(train_set, val_set=train_set)  # val_set only switches cornac's hook on; ours reads valid
            except StopTraining:
                pass
        curves[dropout] = validator.curve
        if validator.best_state is not None and (best is None or validator.best > best[0]):
            model.model.load_state_dict(validator.best_state)
            best = (validator.best, dropout, validator, model.model)
    if best is None:
        raise ConfigError("eval.sasrec.epochs", f"no validation ran: epochs {cfg['epochs']} < eval_every "
                                                f"{cfg['eval_every']}")
    _, dropout, validator, net = best
    val = next(c for c in validator.curve if c["epoch"] == validator.best_epoch)
    return SASRecRun(net, dropout, validator.best_epoch, val, curves, time.perf_counter() - start)


def mean_metrics(idx: np.ndarray, queries: pd.DataFrame, items: pd.DataFrame, k: int) -> dict:
    """Mean recall@k and NDCG@k over queries, with the evaluation's own metric code."""
    frame = ranked_frame(queries["query_id"], idx, np.zeros(idx.shape), items["item_id"].to_numpy())
    table = per_query_metrics(target_ranks(frame, target_pairs(queries, items)), [k])
    return {"recall": float(table[f"recall@{k}"].mean()), "ndcg": float(table[f"ndcg@{k}"].mean())}


# --------------------------------------------------------------------------- the baseline
@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch on `n` threads for a while (eval.sasrec.threads), the caller's count restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class FittedSASRec:
    """A fitted SASRec row: its chosen checkpoint and what ranking a query needs (item rows, history length)."""

    run: SASRecRun
    rows: dict[str, int]
    max_len: int
    threads: int
    sessions: int

    def rank(self, queries: pd.DataFrame, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(N, depth) item rows and scores per query over all items, best first (history items kept)."""
        with torch_threads(self.threads):
            return search(self.run.net, padded(queries, self.rows, self.max_len, len(self.rows)), depth, False)


FIT_CACHE_SIZE = 2  # fitted models kept per process (SASRec and SASRec + text of one run)
FIT_CACHE: OrderedDict[str, FittedSASRec] = OrderedDict()


def fit_key(params: dict, data, text: bool) -> str:
    """What a fit reads: its settings, the seed and the data (query and item ids, the text vectors when used)."""
    ev = params["eval"]
    settings = {"sasrec": sasrec_config(params), "seed": int(params["seed"]), "text": text,
                "max_history": int(params["data"]["max_history"]), "headline_k": int(ev["headline_k"]),
                "exclude_history": bool(ev.get("exclude_history"))}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for frame, column in ((data.train, "query_id"), (data.valid, "query_id"), (data.items, "item_id")):
        if frame is not None:
            digest.update("\0".join(map(str, frame[column])).encode() + b"\1")
    if text:
        digest.update(np.ascontiguousarray(data.item_emb).tobytes())
    return digest.hexdigest()


def fitted_sasrec(params: dict, data, text: bool) -> FittedSASRec | None:
    """SASRec (text=False) or SASRec + text fitted on `data`'s train split, checkpoint chosen on its valid
    split; None (logged) when it does not apply. Kept in FIT_CACHE, so the rows that read one fit in one
    process (`SASRec + text` and `SASRec + text + fusion` in one evaluate step) train it once."""
    label = baseline_label("sasrec_text" if text else "sasrec")
    cfg, seed, ev = sasrec_config(params), int(params["seed"]), params["eval"]
    k_val, exclude = int(ev["headline_k"]), bool(ev.get("exclude_history"))
    rows = {item_id: row for row, item_id in enumerate(data.items["item_id"])}
    n_items = len(rows)
    valid = history_queries(data.valid if data.valid is not None else data.train.iloc[:0])
    sessions = [s for s in train_sessions(data.train, rows, int(params["data"]["max_history"])) if len(s) >= 2]
    why = ("no training sequences (queries without histories)" if not sessions else
           "no validation query with a history" if valid.empty else
           "no test query with a history" if history_queries(data.test).empty else "")
    if why:
        log.warning("%s row skipped: %s in dataset %s", label, why, params.get("dataset"))
        return None
    key = fit_key(params, data, text)
    if key in FIT_CACHE:
        FIT_CACHE.move_to_end(key)
        return FIT_CACHE[key]
    val_seqs = padded(valid, rows, cfg["max_len"], n_items)

    def val_fn(net) -> dict:
        return mean_metrics(search(net, val_seqs, k_val, exclude)[0], valid, data.items, k_val)

    with torch_threads(cfg["threads"]):
        run = fit_sasrec(cornac_train_set(sessions, n_items, seed), val_fn, cfg, seed,
                         data.item_emb if text else None, cfg["val_metric"])
    log.info("%s: dropout %s, epoch %d, valid %s, %.0f s", label, run.dropout, run.epoch, run.val, run.seconds)
    fit = FIT_CACHE[key] = FittedSASRec(run, rows, cfg["max_len"], cfg["threads"], len(sessions))
    while len(FIT_CACHE) > FIT_CACHE_SIZE:
        FIT_CACHE.popitem(last=False)
    return fit


def run_sasrec_ids(params: dict, data, k: int) -> pd.DataFrame | None:
    """The `sasrec` baseline's runner (components/baselines/registry.py): SASRec on item ids."""
    return run_sasrec(params, data, k, text=False)


def run_sasrec_text(params: dict, data, k: int) -> pd.DataFrame | None:
    """The `sasrec_text` baseline's runner: SASRec with the items' text embeddings."""
    return run_sasrec(params, data, k, text=True)


def run_sasrec(params: dict, data, k: int, text: bool) -> pd.DataFrame | None:
    """Top-k test results of `SASRec` (text=False) or `SASRec + text`; None (logged) when it does not apply.

    `data`: components.evaluation.evaluate.EvalInputs (with its valid split). The fit's record (dropout,
    epoch, validation metrics, curves, seconds) is in the frame's attrs["sasrec"].
    """
    fit = fitted_sasrec(params, data, text)
    if fit is None:
        return None
    idx, vals = fit.rank(data.test, k)
    frame = ranked_frame(data.test["query_id"], idx, vals, data.items["item_id"].to_numpy())
    run = fit.run
    frame.attrs["sasrec"] = {"row": baseline_label("sasrec_text" if text else "sasrec"), "seed": int(params["seed"]),
                             "dropout": run.dropout, "epoch": run.epoch, "val": run.val, "curves": run.curves,
                             "seconds": round(run.seconds, 1), "train_sessions": fit.sessions}
    return frame

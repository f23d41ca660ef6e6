"""Issue 25 probes on training, SID versions and the flow commands (findings 6, 7, 8 and 15).

6: a missing, empty or partial --a / --b folder of `sa2crq candidates` is one line, not the live
   version compared with itself. 7: the SID version follows everything that decides an SID, and
   evaluation refuses a retriever trained on another version. 8: a run whose loss or weights stop
   being finite fails with one line and writes no checkpoint. 15: expected errors inside a Prefect
   flow print the CLI's one line, without Prefect's run tracebacks; a bug keeps its traceback.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_params as tiny_retriever_params
from helpers import write_catalog as write_retriever_catalog
from tokenizer_fixtures import make_catalog, run_tokenizer
from tokenizer_fixtures import tiny_params as tiny_tokenizer_params
from torch.utils.data import DataLoader, TensorDataset

from components.retrieval.best_epoch import Loaders, fit_best_epoch
from components.runtime.divergence import TrainingDiverged
from components.runtime.errors import DataError, Sa2crqError
from components.runtime.prefect_api import ExpectedErrorFilter
from flows.candidates_flow import candidates_flow

ROOT = Path(__file__).resolve().parents[2]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# ---- finding 8: a diverged run writes nothing -----------------------------------------------

class NanLater(L.LightningModule):
    """A good first epoch (its validation score is the best), then a non-finite loss."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch, batch_idx):
        loss = (self.w * batch[0]).pow(2).mean()
        return loss * float("nan") if self.current_epoch == 1 else loss

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.log("val_recall@10", 1.0 - 0.1 * self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_loss_gone_nan_fails_the_fit_even_after_a_good_epoch():
    dl = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)
    kwargs = dict(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False)
    with pytest.raises(TrainingDiverged, match=r"^demo: training diverged at epoch 1.*loss nan.*lower demo\.lr"):
        fit_best_epoch(NanLater(), kwargs, Loaders(dl, dl), "val_recall@10", 0, job="demo", keys="demo.lr")


def test_a_diverging_retriever_writes_no_checkpoint(tmp_path, monkeypatch):
    """A retriever whose loss goes nan (the schema bounds retriever.lr, and every step checks params first, so
    the divergence is made in the loss, as the Stage-2 probe below does)."""
    from components.retrieval.retriever import RetrieverModel
    from components.retrieval.retriever_train import run_train_retriever

    write_retriever_catalog(tmp_path)
    params = tiny_retriever_params(tmp_path, epochs=2)
    real = RetrieverModel.loss
    monkeypatch.setattr(RetrieverModel, "loss", lambda self, batch: real(self, batch) * np.nan)
    before = _files(tmp_path)
    with pytest.raises(TrainingDiverged, match=r"^train_retriever: training diverged .*retriever\.lr"):
        run_train_retriever(params)
    written = _files(tmp_path) - before
    assert not [f for f in written if not f.startswith("logs/")]   # no model.pt, curve or metrics


def test_non_finite_weights_fail_the_fit_even_with_a_finite_loss():
    """A parameter the loss does not read (ACRQ Stage 2's unused extension rows) overflowing to inf."""

    class InfWeights(NanLater):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(2))

        def training_step(self, batch, batch_idx):
            with torch.no_grad():
                self.unused.fill_(float("inf"))
            return (self.w * batch[0]).pow(2).mean()

    dl = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)
    kwargs = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False)
    with pytest.raises(TrainingDiverged, match=r"at epoch 0, step 2 \(non-finite weights in unused\)"):
        fit_best_epoch(InfWeights(), kwargs, Loaders(dl), "val_recall@10", 0, job="demo", keys="demo.lr")


def test_a_diverging_tokenizer_writes_no_checkpoint(tmp_path, monkeypatch):
    """sa2crq's RQ-VAE Stage 1 whose loss goes nan (made in the loss: the schema bounds tokenizer.lr)."""
    from components.tokenizers.rqvae import RQVAE
    from components.tokenizers.tokenizer_stages import run_train_head

    monkeypatch.setenv("WANDB_MODE", "disabled")
    make_catalog(tmp_path)
    params = tiny_tokenizer_params(tmp_path, "sa2crq")
    real = RQVAE.losses
    monkeypatch.setattr(RQVAE, "losses", lambda self, x: {**real(self, x), "loss": real(self, x)["loss"] * np.nan})
    with pytest.raises(TrainingDiverged, match=r"^tokenizer training: training diverged .*\(loss nan.*tokenizer\.lr"):
        run_train_head(params)
    assert not (tmp_path / "tokenizer").exists()


def test_a_diverging_stage_2_writes_no_checkpoint(tmp_path, monkeypatch):
    """ACRQ Stage 2 (train_tail) whose loss goes nan: head.pt stays, no tail.pt."""
    from components.tokenizers.rqvae import RQVAE
    from components.tokenizers.tokenizer_stages import run_train_head, run_train_tail

    monkeypatch.setenv("WANDB_MODE", "disabled")
    make_catalog(tmp_path)
    params = tiny_tokenizer_params(tmp_path, "sa2crq")
    run_train_head(params)
    real = RQVAE.losses
    monkeypatch.setattr(RQVAE, "losses", lambda self, x: {**real(self, x), "loss": real(self, x)["loss"] * np.nan})
    with pytest.raises(TrainingDiverged, match=r"^tokenizer training: training diverged at epoch 0, step 1 \(loss nan"):
        run_train_tail(params)
    assert sorted(p.name for p in (tmp_path / "tokenizer").iterdir()) == ["head.pt"]


# ---- finding 7: the SID version --------------------------------------------------------------

def test_the_sid_version_follows_codes_and_tokenizer_files(tmp_path):
    from components.tokenizers.sid_table import make_sid_table, sid_version

    meta = {"codebook_sizes": [4, 4], "max_len": 2, "version": "ignored"}
    table = make_sid_table(["a", "b", "c"], [[0, 1], [1], [2, 3]], "full", "x")
    other = make_sid_table(["a", "b", "c"], [[0, 1], [1], [2, 2]], "full", "x")   # one item's codes differ
    tok = tmp_path / "tail.pt"
    tok.write_bytes(b"one")
    version = sid_version("sa2crq", table, meta, [tok])
    assert version.startswith("sa2crq-") and version == sid_version("sa2crq", table, {**meta, "version": "y"}, [tok])
    assert sid_version("sa2crq", other, meta, [tok]) != version
    tok.write_bytes(b"two")                                                         # a tail tokenizer trained again
    assert sid_version("sa2crq", table, meta, [tok]) != version


@pytest.mark.slow
def test_training_the_tail_again_changes_the_sid_version(tmp_path, monkeypatch):
    """Finding 7 as reported: train_tail with other epochs, then assign_ids, kept the old version."""
    from components.tokenizers.sid_table import changed_sids
    from components.tokenizers.tokenizer_stages import run_assign_ids, run_train_tail

    monkeypatch.setenv("WANDB_MODE", "disabled")
    make_catalog(tmp_path)
    params = tiny_tokenizer_params(tmp_path, "sa2crq")
    first = run_tokenizer(params)
    params["tokenizer"]["epochs_tail"] = 3
    run_train_tail(params)
    run_assign_ids(params)
    second = pd.read_parquet(tmp_path / "sids" / "sid_table.parquet")
    second["codes"] = second["codes"].map(list)
    assert changed_sids(first, second)                  # the probe's premise: some SIDs moved
    meta = json.loads((tmp_path / "sids" / "meta.json").read_text())
    assert meta["version"] == second["version"].iloc[0] != first["version"].iloc[0]


def test_evaluation_refuses_a_retriever_trained_on_other_sids(tmp_path):
    import components.evaluation.evaluate as evaluate_mod
    from components.retrieval.retriever_train import run_train_retriever
    from components.tokenizers.sid_table import read_sid_table, sid_version, write_sid_table

    write_retriever_catalog(tmp_path)
    params = tiny_retriever_params(tmp_path, epochs=1, item_head=False, fusion={"sources": "none"})
    run_train_retriever(params)                          # trained on version t1
    table = read_sid_table(tmp_path / "sids" / "sid_table.parquet")
    meta = json.loads((tmp_path / "sids" / "meta.json").read_text())
    table.at[3, "codes"], table.at[3, "length"] = [3, 3, 2], 3   # SIDs assigned again: one item moved
    table["version"] = meta["version"] = sid_version("test", table, meta)
    write_sid_table(table, tmp_path / "sids" / "sid_table.parquet")
    (tmp_path / "sids" / "meta.json").write_text(json.dumps(meta))
    test = pd.read_parquet(tmp_path / "prepared" / "queries.parquet").head(4)
    with pytest.raises(DataError, match=rf"model\.pt: trained on SID version 't1', but .* holds version "
                                        rf"'{meta['version']}': run train_retriever again"):
        evaluate_mod.run_generative(params, test)


# ---- finding 6: the A / B folders of candidates ------------------------------------------------

def _base(out: Path) -> dict:
    """Params whose out_dir is a (fake) live version: a typo'd --a must not fall back to it."""
    from components.runtime.config import load_params

    for part in ("prepared", "embeddings", "sids", "retriever"):
        (out / part).mkdir(parents=True)
    return load_params(ROOT / "params.yaml", [f"out_dir={out}"])


@pytest.mark.parametrize("case", ["missing", "file", "empty", "unrelated", "partial"])
def test_a_folder_that_is_no_model_version_is_refused(tmp_path, case):
    params = _base(tmp_path / "live")
    a = tmp_path / "A"
    if case == "file":
        a.write_text("x")
    elif case in ("empty", "unrelated", "partial"):
        a.mkdir()
        if case == "unrelated":
            (a / "notes.txt").write_text("x")
        if case == "partial":
            (a / "sids").mkdir()                          # a SID-table-only version without its table
    expect = {"missing": "no such folder", "file": "not a folder", "empty": "not a model version, it has none of",
              "unrelated": "not a model version, it has none of",
              "partial": "not a model version, sids/ lacks sid_table.parquet, meta.json"}[case]
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"query_id": "q1", "history": ["x"]}\n')
    with pytest.raises(Sa2crqError, match=f"^candidates --a {a}: {expect}"):
        candidates_flow.fn(params=params, opt_a=str(a), opt_b=str(tmp_path / "live"), opt_queries=str(queries),
                           opt_out=str(tmp_path / "ab"))
    assert not (tmp_path / "ab").exists()


# ---- finding 15: Prefect's tracebacks of expected errors ----------------------------------------

def _record(name: str, run: str, msg: str, exc: BaseException | None = None) -> logging.LogRecord:
    key = "task_run_id" if name.endswith("task_runs") else "flow_run_id"
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.makeLogRecord({"name": name, "msg": msg, "levelno": logging.ERROR, "exc_info": exc_info, key: run})


def test_the_console_filter_drops_expected_errors_of_their_run_only():
    quiet = ExpectedErrorFilter()
    bad_input = DataError("new.jsonl", "duplicate id 'd'", column="item_id", rows=[1])
    assert not quiet.filter(_record("prefect.task_runs", "t1", "Task run failed with exception", bad_input))
    assert not quiet.filter(_record("prefect.task_runs", "t1", "Finished in state Failed(...)"))
    assert quiet.filter(_record("prefect.task_runs", "t2", "Finished in state Failed(...)"))   # another run
    assert not quiet.filter(_record("prefect.flow_runs", "f1", "Encountered exception", FileNotFoundError("x")))
    assert quiet.filter(_record("prefect.flow_runs", "f2", "Encountered exception", RuntimeError("a bug")))
    assert quiet.filter(_record("other.logger", "t1", "same error elsewhere", bad_input))


def _live_out(out: Path) -> None:
    """A live version whose catalog has items a, b, c: enough for retrain to read new items."""
    for part in ("prepared", "embeddings", "tokenizer", "sids", "retriever"):
        (out / part).mkdir(parents=True)
    (out / "sids" / "meta.json").write_text(json.dumps({"version": "v1"}))
    pd.DataFrame({"item_id": ["a", "b", "c"], "text": ["x", "y", "z"], "popularity": [3, 2, 0],
                  "group": ["head", "tail", "cold"]}).to_parquet(out / "prepared" / "items.parquet")


NEW_ITEMS = {
    "known.jsonl": (b'{"item_id": "d", "text": "new"}\n{"item_id": "b", "text": "again"}\n', "already in the catalog"),
    "duplicate.jsonl": (b'{"item_id": "d", "text": "one"}\n{"item_id": "d", "text": "two"}\n', "duplicate id"),
    "blank_text.csv": (b"item_id,text\nd,\n", "text"),
    "binary.jsonl": (bytes(range(256)) * 4, "binary.jsonl"),
}


# one process runs every case (imports once), as a terminal would: stderr is the real fd 2
CLI_CASES = """
import json, sys
import flows.retrain_flow
from sa2crq.cli import main

def bug(path, catalog):
    raise RuntimeError("a bug, not bad input")

for argv in json.loads(sys.argv[1]):
    print("=== case", flush=True, file=sys.stderr)
    if argv[0] == "bug":
        flows.retrain_flow.read_new_items, argv = bug, argv[1:]
    try:
        rc = main(argv)
    except RuntimeError as exc:
        rc = repr(exc)
    print(json.dumps(rc), flush=True)
"""


def _cli(cases: list[list[str]]) -> list[tuple[object, list[str]]]:
    """(exit status, stderr lines) of `sa2crq <argv>` per case, on the test's Prefect server."""
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url), "PYTHONPATH": str(ROOT)}
    env.pop("SA2CRQ_DEBUG", None)
    run = subprocess.run([sys.executable, "-c", CLI_CASES, json.dumps(cases)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    codes = [json.loads(line) for line in run.stdout.splitlines() if line and line[0] in "0123456789\""]
    errs = run.stderr.split("=== case\n")[1:]
    assert len(codes) == len(errs) == len(cases), run.stderr[-3000:]
    return [(rc, err.strip().splitlines()) for rc, err in zip(codes, errs)]


def _own(err: list[str]) -> list[str]:
    """stderr without Prefect's client chatter ("EventsWorker - Still processing items" on a busy
    machine): its run records and tracebacks are what must not be there, so they stay."""
    return [line for line in err if not line.split(" | ")[-1].startswith("EventsWorker")]


@pytest.mark.slow
def test_flow_commands_print_one_line_for_bad_input(tmp_path, prefect_server):
    """retrain with bad new-items files, candidates with a typo'd --a or bad queries: the final line alone
    (Prefect printed 2-4 tracebacks, 62-112 lines, before it), the tracebacks in the flow log;
    a bug inside a flow keeps its tracebacks on the terminal."""
    out = tmp_path / "out"
    _live_out(out)
    cases = []
    for name, (content, _) in NEW_ITEMS.items():
        (tmp_path / name).write_bytes(content)
        cases.append(["retrain", "--new-items", str(tmp_path / name), "-s", f"out_dir={out}"])
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"query_id": "q1", "history": ["a"]}\n')
    cases.append(["candidates", "--a", str(tmp_path / "typo"), "--b", str(out), "--queries", str(queries),
                  "--out", str(tmp_path / "ab"), "-s", f"out_dir={out}"])
    (tmp_path / "bad_q.jsonl").write_text('{"query_id": "q1"}\n')
    sids_only = tmp_path / "v" / "sids"                   # a SID-table-only version: passes the folder check
    sids_only.mkdir(parents=True)
    for name in ("sid_table.parquet", "meta.json"):
        (sids_only / name).write_text("")
    cases.append(["candidates", "--a", str(sids_only.parent), "--b", str(sids_only.parent), "--queries",
                  str(tmp_path / "bad_q.jsonl"),
                  "--out", str(tmp_path / "ab"), "-s", f"out_dir={out}"])
    (tmp_path / "new.jsonl").write_text('{"item_id": "d", "text": "new"}\n')
    cases.append(["bug", "retrain", "--new-items", str(tmp_path / "new.jsonl"), "-s", f"out_dir={out}"])
    results = [(rc, _own(err)) for rc, err in _cli(cases)]
    for (name, (_, expect)), (rc, err) in zip(NEW_ITEMS.items(), results):
        assert rc == 2 and len(err) == 1, (name, err)
        assert err[0].startswith(f"sa2crq: error: {tmp_path / name}") and expect in err[0], (name, err)
    assert results[len(NEW_ITEMS)] == (2, [f"sa2crq: error: candidates --a {tmp_path / 'typo'}: no such folder"])
    assert results[len(NEW_ITEMS) + 1] == (2, [f"sa2crq: error: {tmp_path / 'bad_q.jsonl'}, column 'text': missing "
                                               "column (need 'text' or 'history')"])
    rc, err = results[-1]
    assert rc == "RuntimeError('a bug, not bad input')" and sum("Traceback" in line for line in err) >= 2
    assert "Traceback" in (out / "logs" / "flows.log").read_text()

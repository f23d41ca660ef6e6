"""Multi-process retriever training (Lightning DDP on 2 CPU processes, gloo): the batches are
sharded over the ranks, global rank 0 alone holds the out_dir lock and writes the outputs, and
the model's validation recall matches single-process training within noise."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import tiny_params, write_catalog

from components.retrieval.retriever_train import run_train_retriever
from components.runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"epochs": 8, "batch_size": 8, "patience": 0}
DDP = "ddp_find_unused_parameters_true"   # a batch holds one query kind: the other kind's encoder is unused


def _overrides(params: dict) -> list[str]:
    """-s flags that rebuild tiny_params' retriever section on the command line."""
    flags = [f"out_dir={params['out_dir']}", "wandb.mode=disabled"]
    flags += [f"retriever.{k}={json.dumps(v)}" for k, v in params["retriever"].items() if not isinstance(v, dict)]
    return [arg for flag in flags for arg in ("-s", flag)]


@pytest.mark.slow
def test_ddp_on_two_processes_matches_single_process_training(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "ddp"
    for out in (single, multi):
        write_catalog(out, users=40)
    reference = run_train_retriever(tiny_params(single, **TRAIN))

    params = tiny_params(multi, **TRAIN)
    cmd = [sys.executable, "-m", "sa2crq.cli", "stage", "train_retriever", *_overrides(params),
           "-s", f"retriever.trainer.strategy={DDP}", "-s", "retriever.trainer.devices=2",
           "-s", "retriever.trainer.accelerator=cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in run.stderr                      # a second process trained
    assert run.stdout.count('"best_epoch"') == 1               # one summary: rank 1 reports (and writes) nothing
    summary = json.loads((multi / "metrics" / "retriever_train.json").read_text())
    curve = pd.read_csv(multi / "plots" / "retriever_curve.csv")
    assert (multi / "retriever" / "model.pt").exists() and len(curve) == summary["epochs_run"] == TRAIN["epochs"]
    assert summary["n_train_pairs"] == reference["n_train_pairs"]
    # half the steps per rank (sharded batches, double the effective batch): the same recall within noise
    assert reference["best_val_recall@10"] > 0.5
    assert abs(summary["best_val_recall@10"] - reference["best_val_recall@10"]) <= 0.15
    assert not any(p.name.startswith(".") and p.name != ".sa2crq.lock" for p in multi.iterdir())


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_without_unused_parameter_detection_is_refused_before_any_work(tmp_path, strategy):
    write_catalog(tmp_path)
    params = tiny_params(tmp_path)
    params["retriever"]["trainer"].update(strategy=strategy, devices=2)
    with pytest.raises(ConfigError, match=f"retriever.trainer.strategy.*{strategy}_find_unused_parameters_true"):
        run_train_retriever(params)
    assert not (tmp_path / "retriever").exists() and not (tmp_path / "logs").exists()

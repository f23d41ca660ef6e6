"""Lightning-native tokenizer training: per-epoch losses in a CSV log under out_dir (and in the
checkpoint's history), dead-code re-seeding and SARQ re-estimation as callbacks, hyperparameters
saved, the accelerator taken from params."""
from __future__ import annotations

import pandas as pd
import pytest
from tokenizer_fixtures import ROOT, make_catalog, run_tokenizer, tiny_params

from components.runtime.config import load_params
from components.runtime.errors import ConfigError
from components.tokenizers.rqvae import RQVAE, ReestimatePathTable
from components.tokenizers.sid_tokenizer import load_checkpoint


def test_train_head_logs_each_epoch_and_reseeds_through_callbacks(tmp_path):
    make_catalog(tmp_path)
    params = tiny_params(tmp_path, "sa2crq", "tokenizer.accelerator=cpu")
    table = run_tokenizer(params)
    assert len(table) == 146
    head = load_checkpoint(tmp_path / "tokenizer" / "head.pt")
    history = head["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    # re-seeding every epoch but the last (ReseedDeadCodes), one count per layer
    assert all(len(row["reseeded"]) == 3 for row in history[:-1]) and "reseeded" not in history[-1]
    log = pd.read_csv(tmp_path / "logs" / "train_head" / "metrics.csv")
    epochs = log.dropna(subset=["epoch_loss"])
    assert epochs["epoch"].tolist() == [0, 1, 2]
    assert epochs["epoch_loss"].tolist() == pytest.approx([row["loss"] for row in history])
    tail_log = pd.read_csv(tmp_path / "logs" / "train_tail" / "metrics.csv")
    assert tail_log["epoch_loss"].notna().sum() == 2


def test_rqvae_saves_its_hyperparameters_and_callbacks_follow_the_schedule():
    from components.tokenizers.quantizer import ResidualQuantizer

    model = RQVAE(8, [16], 4, ResidualQuantizer([4, 4], 4))
    assert dict(model.hparams) == {"in_dim": 8, "hidden_dims": [16], "latent_dim": 4}
    calls = []
    model.reestimate_table = lambda: calls.append("table")

    class Trainer:
        current_epoch, max_epochs = 0, 5

    reestimate = ReestimatePathTable(warmup_epochs=2, every=2)
    for epoch in range(5):
        Trainer.current_epoch = epoch
        before = len(calls)
        reestimate.on_train_epoch_end(Trainer, model)
        assert (len(calls) > before) == (epoch + 1 in (2, 4))


def test_a_bad_accelerator_is_refused_by_the_schema(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer.accelerator"):
        load_params(ROOT / "params.yaml", [f"out_dir={tmp_path}", "tokenizer.accelerator=quantum"])

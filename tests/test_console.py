"""Logs written to a file read well: progress as lines, no carriage returns, no Lightning tips; a terminal
keeps its bars (components/runtime/console.py, components/runtime/train_loggers.py line_progress)."""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest
from helpers import ROOT, write_catalog
from tqdm import tqdm

from components.runtime import console
from components.runtime.console import LineStream, lines_when_redirected


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _bar(stream, n: int = 50, **kwargs) -> None:
    for _ in tqdm(range(n), desc="work", file=stream, mininterval=0, miniters=1, **kwargs):
        pass


def test_a_redirected_bar_prints_its_first_and_last_state_as_lines():
    out = io.StringIO()
    _bar(LineStream(out, every_s=3600))
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 2 and "0/50" in lines[0] and "100%" in lines[1] and "50/50" in lines[1]


def test_every_s_paces_the_lines():
    out = io.StringIO()
    _bar(LineStream(out, every_s=0), n=5)
    assert "\r" not in out.getvalue()
    counts = [line.split("|")[-1].split()[0] for line in out.getvalue().splitlines()]
    assert counts[:6] == [f"{i}/5" for i in range(6)] and set(counts[6:]) <= {"5/5"}   # one line per refresh


def test_a_bar_that_clears_itself_leaves_nothing_and_text_passes_through():
    out = io.StringIO()
    stream = LineStream(out, every_s=3600)
    stream.write("before")
    stream.write("\n")
    _bar(stream, leave=False)
    print("after", file=stream)
    assert out.getvalue().splitlines()[0] == "before" and out.getvalue().splitlines()[-1] == "after"
    assert "\r" not in out.getvalue() and "100%" not in out.getvalue()


def test_only_a_redirected_stderr_is_wrapped(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    lines_when_redirected()
    assert sys.stderr is terminal
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    lines_when_redirected()
    wrapped = sys.stderr
    lines_when_redirected()
    assert isinstance(wrapped, LineStream) and sys.stderr is wrapped and not console.stderr_is_tty()


def test_line_progress_only_off_a_terminal_and_no_tips(monkeypatch, caplog):
    from components.runtime.train_loggers import LineProgressBar, line_progress

    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert line_progress(True) == []
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert [type(cb) for cb in line_progress(True)] == [LineProgressBar] and line_progress(False) == []
    from lightning.pytorch.utilities import rank_zero_info

    # caught where rank_zero_info logs: lightning.pytorch stops propagation to the root when it is imported
    # before any root handler exists, which depends on the tests that ran first
    source = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    source.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=source.name):
            rank_zero_info("💡 Tip: For seamless cloud logging, try installing [litlogger]")
            rank_zero_info("GPU available: False")
    finally:
        source.removeHandler(caplog.handler)
    assert "Tip:" not in caplog.text and "GPU available" in caplog.text


@pytest.mark.slow
def test_a_training_step_logged_to_a_file_reads_as_lines(tmp_path):
    """`sa2crq stage train_retriever` (a tiny catalog, 3 epochs) with stderr in a file: the epochs and the
    validation decode are reported as lines, with no carriage return and no Lightning tip."""
    write_catalog(tmp_path, users=40)
    tiny = {"d_model": 32, "n_heads": 2, "n_layers": 1, "ff_dim": 64, "dropout": 0.0, "n_memory": 2, "lr": 0.01,
            "batch_size": 16, "epochs": 3, "beam": 10, "eval_beam": 10, "val_max_queries": 0, "warmup_steps": 0,
            "decode_batch_size": 1, "fusion.beam": 10}   # one query per decode batch: a decode bar over 40 queries
    sets = [a for k, v in tiny.items() for a in ("-s", f"retriever.{k}={v}")]
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-m", "sa2crq", "stage", "train_retriever", "-s", f"out_dir={tmp_path}",
                               "-s", "wandb.mode=disabled", *sets], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)
    text = log.read_text()
    assert proc.returncode == 0, text[-2000:]
    assert "\r" not in text and "Tip:" not in text
    assert sum(line.startswith("epoch ") and " done: " in line and "train_loss" in line
               for line in text.splitlines()) == 3
    assert any(line.startswith("decode:") and "100%" in line for line in text.splitlines())

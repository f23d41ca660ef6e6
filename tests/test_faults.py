"""Faults that land mid-write: real `sa2crq stage <step>` processes on the smoke profile, killed
with SIGKILL the moment their temporary output file appears, then rerun; and a full disk.

A rerun must give the outputs of an uninterrupted run (byte for byte; timings in the metrics
aside) and leave no temporary file. embed is not killed here: it writes through the same
atomic_dir as prepare and takes a minute on the smoke slice; evaluate writes its JSON through
the same atomic_path as assign_ids' metadata.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, data_root

from components.runtime.atomic import is_temp_name
from components.runtime.locks import LOCK_FILE

pytestmark = pytest.mark.slow

TRAIN = ("train_head", "train_tail", "assign_ids", "train_retriever")


def _cmd(step: str, out: Path) -> list[str]:
    """The step on the smoke profile (one retriever epoch: a kill lands in the final write all the same)."""
    return [str(Path(sys.executable).parent / "sa2crq"), "stage", step, "--params", str(ROOT / "params.yaml"),
            "-s", "profile=smoke", "-s", f"data.root={data_root()}", "-s", f"out_dir={out}",
            "-s", "retriever.epochs=1"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}


def stage(step: str, out: Path) -> subprocess.CompletedProcess:
    """`sa2crq stage <step>` in a process of its own (cwd out's parent: Lightning writes runs/ there)."""
    return subprocess.run(_cmd(step, out), env=_env(), cwd=out.parent, capture_output=True, text=True, timeout=600)


def run_ok(step: str, out: Path) -> None:
    res = stage(step, out)
    assert res.returncode == 0, f"{step}: {res.stderr[-3000:]}"


def kill_at_temp(step: str, out: Path, watch: str, target: str) -> Path:
    """Start the step and SIGKILL it as soon as the temporary of out/watch/target appears; returns
    that temporary, which must still be there (the kill landed before the write finished)."""
    folder = out / watch
    proc = subprocess.Popen(_cmd(step, out), env=_env(), cwd=out.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                names = []
            hit = [n for n in names if n.startswith(f".{target}.") and is_temp_name(n)]
            if hit:
                proc.kill()
                assert proc.wait() == -9
                assert (folder / hit[0]).exists(), "the step finished its write before the kill"
                return folder / hit[0]
            time.sleep(0.0002)
        pytest.fail(f"{step} ended (rc {proc.returncode}) before a temporary .{target}.* appeared in {folder}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if is_temp_name(p.name)]


def same_files(a: Path, b: Path, rel: list[str]) -> None:
    for r in rel:
        assert (a / r).read_bytes() == (b / r).read_bytes(), r


def without_timings(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if "seconds" not in k}


def with_inputs(root: Path, name: str, src: Path, folders: tuple[str, ...]) -> Path:
    out = root / name / "out"
    for f in folders:
        shutil.copytree(src / f, out / f)
    return out


# `sa2crq stage <step> ARGS` for each step named in argv[1], in one process (one start, one torch import)
STAGES_IN_ONE = """import sys
from sa2crq.cli import main
for step in sys.argv[1].split(","):
    if main(["stage", step, *sys.argv[2:]]) != 0:
        sys.exit(f"{step} failed")
"""


@pytest.fixture(scope="module")
def reference(smoke_embedded, tmp_path_factory) -> Path:
    """The uninterrupted smoke run of every training step: the stages' own command, in a process of its own."""
    out = with_inputs(tmp_path_factory.mktemp("faults"), "reference", Path(smoke_embedded["out_dir"]),
                      ("prepared", "embeddings"))
    res = subprocess.run([sys.executable, "-c", STAGES_IN_ONE, ",".join(TRAIN), *_cmd("-", out)[3:]], env=_env(),
                         cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_killed_prepare_reruns_to_the_same_outputs(smoke_embedded, tmp_path):
    out = tmp_path / "out"
    kill_at_temp("prepare", out, ".", "prepared")
    assert not (out / "prepared").exists()
    run_ok("prepare", out)
    same_files(out, Path(smoke_embedded["out_dir"]),
               ["prepared/items.parquet", "prepared/queries.parquet", "metrics/popularity.json"])
    assert temporaries(out) == []


@pytest.mark.parametrize("step, inputs, watch, target, compared", [
    ("train_head", ("prepared", "embeddings"), "tokenizer", "head.pt", ["tokenizer/head.pt"]),
    ("train_tail", ("prepared", "embeddings", "tokenizer"), "tokenizer", "tail.pt", ["tokenizer/tail.pt"]),
    ("assign_ids", ("prepared", "embeddings", "tokenizer"), "sids", "sid_table.parquet",
     ["sids/sid_table.parquet", "sids/meta.json"]),
])
def test_killed_tokenizer_step_reruns_to_the_same_outputs(reference, tmp_path, step, inputs, watch, target, compared):
    """A kill mid-write leaves the earlier output (copied from the reference run) or none; the rerun matches."""
    out = with_inputs(tmp_path, "fault", reference, inputs)
    before = (out / watch / target).read_bytes() if (out / watch / target).exists() else None
    kill_at_temp(step, out, watch, target)
    after = (out / watch / target).read_bytes() if (out / watch / target).exists() else None
    assert after == before
    run_ok(step, out)
    same_files(out, reference, compared)
    assert temporaries(out) == []


def test_killed_train_retriever_keeps_the_old_model_and_reruns_to_the_same(reference, tmp_path):
    out = with_inputs(tmp_path, "fault", reference, ("prepared", "embeddings", "tokenizer", "sids"))
    (out / "retriever").mkdir()
    (out / "retriever" / "model.pt").write_bytes(b"the model of an earlier run")
    kill_at_temp("train_retriever", out, "retriever", "model.pt")
    assert (out / "retriever" / "model.pt").read_bytes() == b"the model of an earlier run"
    run_ok("train_retriever", out)
    same_files(out, reference, ["retriever/model.pt", "plots/retriever_curve.csv"])
    assert without_timings(out / "metrics" / "retriever_train.json") == \
        without_timings(reference / "metrics" / "retriever_train.json")
    assert temporaries(out) == []


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mount to fill (root only); yields a function that mounts one of a given size."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(size_kib: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(point)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def _size_kib(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) // 1024


@pytest.mark.parametrize("step,inputs", [("prepare", ()), ("train_head", ("prepared", "embeddings"))])
def test_full_disk_is_one_clear_error_and_nothing_partial(step, inputs, smoke_embedded, small_disk, tmp_path):
    """The step's output does not fit: exit 2 with one line naming the out_dir, no traceback,
    no temporary and no partial output left (parquet write in prepare, torch.save in train_head)."""
    src = Path(smoke_embedded["out_dir"])
    disk = small_disk(64 + sum(_size_kib(src / f) + 16 for f in inputs))
    out = disk / "out"
    out.mkdir()
    for f in inputs:
        shutil.copytree(src / f, out / f)
    before = set(disk.rglob("*"))
    res = stage(step, out)
    assert res.returncode == 2, res.stderr[-3000:]
    # progress written to a pipe comes as lines (components/runtime/train_loggers.LineProgressBar): not the error
    lines = [line for line in res.stderr.strip().splitlines() if not re.match(r"epoch \d+/\d+", line)]
    assert len(lines) == 1 and lines[0].startswith(f"sa2crq: error: {out}/: no space left on device during step {step}"), \
        res.stderr[-3000:]
    # the lock, the output's (empty) folder, and the training log of the epochs that did run (logs/, not an output)
    new = {p for p in set(disk.rglob("*")) - before if out / "logs" not in (p, *p.parents)}
    assert new <= {out / LOCK_FILE, out / "tokenizer"}, new
    assert temporaries(out) == [] and not list((out / "tokenizer").glob("*"))

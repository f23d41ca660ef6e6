"""One lock per output folder: a second process is refused (or waits), a killed holder leaves
no stale lock, the lock is re-entrant within a process, nested folders are their own domains,
and the first holder removes a killed run's temporaries."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, data_root

from components.runtime.atomic import atomic_dir, atomic_path
from components.runtime.errors import BusyError, ConfigError, Sa2crqError
from components.runtime.locks import LOCK_FILE, WAIT_ENV, launched_rank, lock_folder, lock_out_dir, lock_wait

HOLD = "import sys\nfrom components.runtime.locks import lock_folder\nwith lock_folder(sys.argv[1], wait=0):\n" \
       "    print('held', flush=True)\n    sys.stdin.read()\n"
TRY = "import sys\nfrom components.runtime.locks import lock_folder\nwith lock_folder(sys.argv[1], wait=0):\n    pass\n"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", **extra}


def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding folder's lock until its stdin closes (or it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _can_lock_elsewhere(folder: Path) -> bool:
    """Whether another process gets folder's lock at once."""
    return subprocess.run([sys.executable, "-c", TRY, str(folder)], env=_env(), capture_output=True).returncode == 0


def test_other_process_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(BusyError, match=rf"another sa2crq run holds the lock \(pid {proc.pid}, since ") as err:
            with lock_folder(tmp_path, wait=0):
                pass
        assert str(err.value).startswith(f"{tmp_path}/: ") and WAIT_ENV in str(err.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with lock_folder(tmp_path, wait=0):   # the kernel dropped the dead holder's lock: nothing stale
        assert not _can_lock_elsewhere(tmp_path)
    assert _can_lock_elsewhere(tmp_path)


@pytest.mark.parametrize("env", [{"LOCAL_RANK": "1"}, {"NODE_RANK": "2", "LOCAL_RANK": "0"}, {"RANK": "3"}])
def test_a_worker_rank_of_a_ddp_run_takes_no_lock_while_rank_zero_holds_it(tmp_path, monkeypatch, env):
    proc = _holder(tmp_path)          # rank 0 of the same run
    try:
        for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
            monkeypatch.delenv(key, raising=False)
        with pytest.raises(BusyError):
            with lock_out_dir({"out_dir": str(tmp_path)}):
                pass
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert launched_rank() == max(int(v) for v in env.values())
        with lock_out_dir({"out_dir": str(tmp_path)}) as folder:   # a worker rank: no lock, no BusyError
            assert folder == tmp_path
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_waits_when_asked(tmp_path, monkeypatch):
    proc = _holder(tmp_path)
    threading.Timer(1.0, proc.stdin.close).start()   # the holder finishes after a second
    monkeypatch.setenv(WAIT_ENV, "30")
    start = time.monotonic()
    with lock_folder(tmp_path):
        assert time.monotonic() - start >= 0.5
    proc.wait()
    proc = _holder(tmp_path)
    try:
        with pytest.raises(BusyError, match="after waiting 0.3 s"):
            with lock_folder(tmp_path, wait=0.3):
                pass
    finally:
        proc.stdin.close()
        proc.wait()


@pytest.mark.parametrize("raw", ["soon", "-1"])
def test_bad_wait_setting_is_one_clear_error(monkeypatch, raw):
    monkeypatch.setenv(WAIT_ENV, raw)
    with pytest.raises(Sa2crqError, match=WAIT_ENV):
        lock_wait()


def test_reentrant_within_one_process_across_threads(tmp_path):
    """A flow holds the lock and runs steps that take it again, some as tasks in other threads."""
    entered = []

    def step() -> None:
        with lock_folder(tmp_path, wait=0):
            entered.append(threading.get_ident())

    with lock_folder(tmp_path, wait=0):
        with lock_folder(tmp_path, wait=0):
            step()
        worker = threading.Thread(target=step)
        worker.start()
        worker.join(timeout=10)
        assert not worker.is_alive() and len(entered) == 2
        assert not _can_lock_elsewhere(tmp_path)   # still held until the outermost block ends
    assert _can_lock_elsewhere(tmp_path)


def test_a_run_that_wrote_nothing_leaves_no_folder(tmp_path):
    """Bad input stops a step before it writes: the out_dir its lock created goes again."""
    with pytest.raises(ConfigError):
        with lock_folder(tmp_path / "out" / "nested", wait=0):
            raise ConfigError("dataset", "bad")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any((tmp_path / "out").iterdir())
    with lock_folder(tmp_path / "kept", wait=0) as folder:
        (folder / "metrics.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [LOCK_FILE, "metrics.json"]


def test_nested_folders_are_lock_domains_of_their_own(tmp_path):
    """compare's runs under out_dir/compare/<variant>/seed<k> lock their own folder: no deadlock
    against the outer lock that `sa2crq compare` holds, and still one writer per scratch run."""
    nested = tmp_path / "compare" / "tiger" / "seed0"
    with lock_folder(tmp_path, wait=0):
        with lock_folder(nested, wait=0):
            assert not _can_lock_elsewhere(nested)
        assert _can_lock_elsewhere(nested) and not _can_lock_elsewhere(tmp_path)


def _killed_inside(write) -> None:
    """Run `write` in a forked child that dies inside it (no finally runs), like a SIGKILL mid-write."""
    pid = os.fork()
    if pid == 0:
        try:
            write()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _die_in(context) -> None:
    with context as tmp:
        (tmp / "items.npy" if tmp.is_dir() else tmp).write_text("half")
        os._exit(0)


def test_first_holder_removes_a_killed_runs_temporaries(tmp_path):
    """What atomic writes leave when killed goes; other dotfiles, nested domains and links stay."""
    out = tmp_path / "out"
    _killed_inside(lambda: _die_in(atomic_path(out / "prepared" / "items.parquet")))
    _killed_inside(lambda: _die_in(atomic_dir(out / "embeddings")))
    left = [p for p in out.rglob(".*") if p.name != "prepared"]
    assert len(left) == 2, left
    (out / ".gitignore").write_text("/prepared\n")   # as DVC writes beside its outputs
    nested = out / "compare" / "x" / "seed0"
    _killed_inside(lambda: _die_in(atomic_path(nested / "retriever" / "model.pt")))
    (nested / LOCK_FILE).touch()   # a nested run's domain (its temporaries may be in flight)
    elsewhere = tmp_path / "main"
    _killed_inside(lambda: _die_in(atomic_path(elsewhere / "prepared" / "items.parquet")))
    (out / "linked").symlink_to(elsewhere, target_is_directory=True)
    with lock_folder(out, wait=0):
        assert not any(p.exists() for p in left)
        assert (out / ".gitignore").read_text() == "/prepared\n"
        assert len(list(nested.rglob(".model.pt.*"))) == 1 and len(list(elsewhere.rglob(".items.parquet.*"))) == 1


def test_atomic_dir_swaps_without_a_half_deleted_folder(tmp_path, monkeypatch):
    """The old folder is renamed aside, not deleted in place: a failed swap puts it back whole."""
    target = tmp_path / "prepared"
    target.mkdir()
    (target / "items.parquet").write_text("old")
    real_replace = os.replace

    def failing(src, dst):
        if Path(dst) == target and Path(src).name.startswith(".prepared.") and ".old." not in Path(src).name:
            raise OSError("disk error at the swap")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="at the swap"):
        with atomic_dir(target) as tmp:
            (tmp / "items.parquet").write_text("new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"] and (target / "items.parquet").read_text() == "old"
    with atomic_dir(target) as tmp:
        (tmp / "items.parquet").write_text("new")
    assert (target / "items.parquet").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["prepared"]


def _stage(step: str, out: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "sa2crq"), "stage", step, "--params", str(ROOT / "params.yaml"),
            "-s", "profile=smoke", "-s", f"data.root={data_root()}", "-s", f"out_dir={out}"]


def test_stage_refuses_a_busy_out_dir_then_waits_when_asked(tmp_path):
    """Two `sa2crq stage` runs on one out_dir: the second exits 2 with one line naming the holder,
    writing nothing; with SA2CRQ_LOCK_WAIT it waits for the first and then runs."""
    out = tmp_path / "out"
    with lock_folder(out, wait=0):
        res = subprocess.run(_stage("prepare", out), env=_env(), cwd=tmp_path, capture_output=True, text=True)
        assert res.returncode == 2, res.stderr[-2000:]
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and re.fullmatch(
            rf"sa2crq: error: {re.escape(str(out))}/: another sa2crq run holds the lock \(pid {os.getpid()}, "
            rf"since [0-9-]+ [0-9:]+\); wait for it, or pass --wait SECONDS \(or set {WAIT_ENV}\)", lines[0]), lines
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
        waiting = subprocess.Popen(_stage("prepare", out), env=_env(**{WAIT_ENV: "120"}), cwd=tmp_path,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(4)
        assert waiting.poll() is None and not (out / "prepared").exists()
    assert waiting.wait(timeout=120) == 0, waiting.stderr.read()[-2000:]
    assert (out / "prepared" / "items.parquet").exists()


def test_run_refuses_an_out_dir_dvc_does_not_track():
    """`sa2crq run` (dvc repro) writes outputs/ whatever out_dir says: refuse the mismatch plainly."""
    from flows.step_io import require_dvc_out_dir

    require_dvc_out_dir({"out_dir": "outputs"})
    require_dvc_out_dir({"out_dir": str(ROOT / "outputs")})
    require_dvc_out_dir({})
    with pytest.raises(ConfigError, match=r"'out_dir': `sa2crq run` runs dvc.yaml.*sa2crq stage <name> -s out_dir=elsewhere"):
        require_dvc_out_dir({"out_dir": "elsewhere"})

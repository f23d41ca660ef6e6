"""One exclusive lock per output folder, so two runs never interleave their writes in it.

Every step (components.pipeline.stages.get_step), every flow that writes and the retrain registry
(components/lifecycle/versions.py) hold `<folder>/.sa2crq.lock` (a `filelock` flock: the kernel drops it
when the holder dies, so a killed run never leaves a stale lock) for as long as they write.
A second process is refused at once with BusyError, or waits `SA2CRQ_LOCK_WAIT` seconds.

The lock is re-entrant within one process, across threads (a flow that runs several steps,
each taking the lock again, as Prefect tasks in worker threads): it guards against other
processes, not against the process's own steps. Folders nested in an out_dir (compare's
`compare/<variant>/seed<k>`, sweep points, `candidates --out outputs/ab`) are lock domains of
their own, so a run inside another run's folder never waits for the outer lock.
`sa2crq run` holds out_dir's lock across `dvc exp run` / `dvc repro` (lock_for_children): the
stages DVC starts (`sa2crq stage`, other processes) re-enter it, since HELD_ENV names the folder
and the holder's pid, which the lock file's stamp confirms while the lock is taken.

The first holder of a folder owns it, so the temporary files a killed run left behind
(components.runtime.atomic names) are removed then; nested domains and links are left alone. A run
that created the folder and wrote nothing into it (bad input) removes it again.

A folder the OS will not let the run create or lock (a file in the way, a read-only or full
disk, no permission, a pseudo-filesystem such as /proc) is a PathError naming the path and the
errno's meaning; only a lock another process holds is a BusyError.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from components.runtime.atomic import PathError, is_temp_name, refused_as_path_error
from components.runtime.errors import BusyError, Sa2crqError
from components.runtime.paths import out_path

LOCK_FILE = ".sa2crq.lock"
WAIT_ENV = "SA2CRQ_LOCK_WAIT"   # seconds a run waits for a busy folder (default 0: refuse at once)
HELD_ENV = "SA2CRQ_LOCK_HELD"   # "<pid> <folder>": that process holds the folder's lock for its child processes

log = logging.getLogger(__name__)


def lock_wait() -> float:
    """Seconds to wait for a busy folder, from SA2CRQ_LOCK_WAIT (an env var, so it also reaches
    the `sa2crq stage` processes that `dvc repro` starts)."""
    raw = os.environ.get(WAIT_ENV, "").strip()
    try:
        wait = float(raw) if raw else 0.0
    except ValueError:
        raise Sa2crqError(f"{WAIT_ENV}={raw!r}: must be a number of seconds") from None
    if wait < 0:
        raise Sa2crqError(f"{WAIT_ENV}={raw!r}: must be >= 0 seconds")
    return wait


def _stamp(fd: int) -> None:
    """Write who holds the lock into the lock file, for the message a refused run prints."""
    text = f"{os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, text, 0)


def holder(lock_path: Path) -> str:
    """'pid N, since T' of the current holder, as stamped in the lock file."""
    try:
        pid, since = lock_path.read_text().split(" ", 1)
    except (OSError, ValueError):
        return "pid unknown"
    return f"pid {pid}, since {since.strip()}"


def remove_stale_temps(folder: Path) -> None:
    """Delete atomic-write temporaries under folder (a killed run's leftovers); skip links and
    sub-folders that are lock domains of their own. Only the folder's lock holder may call it."""
    removed = []
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        dirs[:] = [d for d in dirs if not (base / d / LOCK_FILE).exists() and not (base / d).is_symlink()]
        for name in [d for d in dirs if is_temp_name(d)]:
            shutil.rmtree(base / name)
            removed.append(base / name)
            dirs.remove(name)
        for name in files:
            if is_temp_name(name):
                (base / name).unlink()
                removed.append(base / name)
    if removed:
        log.warning("%s: removed %d temporary file(s) left by an interrupted run", folder, len(removed))


@contextmanager
def lock_folder(folder: str | os.PathLike, wait: float | None = None) -> Iterator[Path]:
    """Hold folder's exclusive lock for the block (created if missing); BusyError if another
    process holds it for longer than `wait` seconds (default: SA2CRQ_LOCK_WAIT, else 0)."""
    folder = Path(folder)
    wait = lock_wait() if wait is None else float(wait)
    path = folder / LOCK_FILE
    if _held_for_this_process(folder):   # a stage of `sa2crq run`: the run holds the lock for it
        yield folder
        return
    # one instance per path in this process (is_singleton), shared by its threads: re-entrant
    lock = FileLock(path, thread_local=False, is_singleton=True, on_acquired=_stamp)
    while True:
        created = not folder.exists()
        with refused_as_path_error(folder, "create the output folder"):
            folder.mkdir(parents=True, exist_ok=True)
        try:
            if not _lock_file_ready(folder, path):
                continue   # the holder wrote nothing and removed the folder it had made
            lock.acquire(timeout=wait, blocking=wait > 0)
            break
        except FileNotFoundError:   # the holder removed its empty folder between the two calls
            continue
        except Timeout:
            waited = f" after waiting {wait:g} s" if wait > 0 else ""
            raise BusyError(f"{folder}/: another sa2crq run holds the lock ({holder(path)}){waited}; "
                            f"wait for it, or pass --wait SECONDS (or set {WAIT_ENV})") from None
        except (OSError, PathError) as exc:   # refused by the OS, or the lock not stamped (e.g. a full disk)
            if lock.is_locked:
                lock.release(force=True)
            if created:
                _remove_empty(folder)
            if isinstance(exc, OSError) and exc.errno is not None:
                raise PathError(path, exc, "take the lock") from exc
            raise
    try:
        if lock.lock_counter == 1:
            with refused_as_path_error(folder, "clean the output folder"):
                remove_stale_temps(folder)
        yield folder
    finally:
        if created and lock.lock_counter == 1 and os.listdir(folder) == [LOCK_FILE]:
            path.unlink()   # a run that wrote nothing (bad input) leaves no folder behind
            folder.rmdir()
        lock.release()


def _remove_empty(folder: Path) -> None:
    """Remove a folder this run created and could not lock: the lock file it made, then the folder."""
    with contextlib.suppress(OSError):
        if os.listdir(folder) in ([], [LOCK_FILE]):
            (folder / LOCK_FILE).unlink(missing_ok=True)
            folder.rmdir()


def _lock_file_ready(folder: Path, path: Path) -> bool:
    """Create (or open) the lock file for writing, as the lock will, so that the OS refusing it
    (read-only, no permission, a folder that holds no files such as /proc/self) is a PathError,
    where the lock would keep failing and report a busy folder. False: the folder vanished."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and not folder.is_dir():
            return False
        raise PathError(path, exc, "create the lock file") from exc
    return True


RANK_ENV = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def launched_rank() -> int:
    """This process's rank when a multi-process launcher started it, else 0.

    Lightning's `ddp` strategy re-runs the command once per extra rank with LOCAL_RANK (and
    NODE_RANK on other nodes) set; torchrun and SLURM set RANK / GROUP_RANK / SLURM_PROCID.
    Any non-zero one marks a worker rank: it trains beside rank 0 but neither locks nor writes."""
    ranks = [os.environ.get(key, "").strip() for key in RANK_ENV]
    return max((int(r) for r in ranks if r.isdigit()), default=0)


@contextmanager
def lock_out_dir(params: dict) -> Iterator[Path]:
    """lock_folder on the run's out_dir; a worker rank of a multi-process run (launched_rank)
    takes no lock, since rank 0 holds it and alone writes the outputs."""
    if launched_rank() != 0:
        yield out_path(params)
        return
    with lock_folder(out_path(params)) as folder:
        yield folder


@contextmanager
def lock_for_children(params: dict) -> Iterator[Path]:
    """lock_out_dir, held also for the processes this one starts meanwhile (HELD_ENV): `sa2crq run`
    takes it before `dvc exp run` writes params.yaml, and the stages DVC runs re-enter it."""
    with lock_out_dir(params) as folder:
        before = os.environ.get(HELD_ENV)
        os.environ[HELD_ENV] = f"{os.getpid()} {folder.resolve()}"
        try:
            yield folder
        finally:
            if before is None:
                os.environ.pop(HELD_ENV, None)
            else:
                os.environ[HELD_ENV] = before


def _held_for_this_process(folder: Path) -> bool:
    """Whether an ancestor holds folder's lock for this process: HELD_ENV names another pid and this
    folder, the lock is taken (a non-blocking flock fails) and its stamp names that pid."""
    pid, _, held = os.environ.get(HELD_ENV, "").partition(" ")
    if not held or pid == str(os.getpid()) or Path(held) != folder.resolve():
        return False
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return holder(folder / LOCK_FILE).startswith(f"pid {pid},")
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)

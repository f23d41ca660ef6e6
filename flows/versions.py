"""Model versions under an out_dir: the live one in place, earlier ones under versions/<v>/.

A version is the set of folders a retriever needs to serve: prepared/, embeddings/,
tokenizer/, sids/, retriever/. Retraining builds a candidate in versions/<new>/; promotion
moves the live folders to versions/<old>/ and the candidate's into place. Each move is an
atomic rename; a journal (versions/PROMOTING.json) lists the moves so a crash half-way is
rolled back on the next start (`recover`). `promote(out_dir, old)` is also the rollback.
After promotion, `dvc_commit` records the new outputs in dvc.lock (so `dvc push` stores
them and a git commit of dvc.lock names the version).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from components.atomic import write_json
from flows.step_io import DVC_FILE, PIPELINE_OUT, ROOT

VERSIONED = ("prepared", "embeddings", "tokenizer", "sids", "retriever")
JOURNAL = "PROMOTING.json"
HISTORY = "history.json"
# the DVC stages whose outputs a retrain replaces (evaluate is left to rerun: `dvc repro evaluate`)
RETRAIN_STAGES = ("prepare", "embed", "train_head", "train_tail", "assign_ids", "train_retriever")


def versions_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "versions"


def live_version(out_dir: str | os.PathLike) -> str:
    """The version of the SIDs in place (sids/meta.json `version`)."""
    meta = Path(out_dir) / "sids" / "meta.json"
    if not meta.exists():
        raise FileNotFoundError(f"{meta}: no live SID table (run the pipeline first)")
    return str(json.loads(meta.read_text())["version"])


def next_version(current: str) -> str:
    """`<root>.r<N+1>`: retrains of one tokenizer build are numbered in order."""
    root, _, n = current.rpartition(".r")
    if root and n.isdigit():
        return f"{root}.r{int(n) + 1}"
    return f"{current}.r1"


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def _undo(moves: list[list[str]]) -> None:
    """Reverse completed moves, last first (each entry is [src, dst] as done)."""
    for src, dst in reversed(moves):
        if Path(dst).exists() and not Path(src).exists():
            _move(Path(dst), Path(src))


def recover(out_dir: str | os.PathLike) -> bool:
    """Roll back a promotion that crashed half-way; True when there was one."""
    journal = versions_dir(out_dir) / JOURNAL
    if not journal.exists():
        return False
    _undo(json.loads(journal.read_text())["moves"])
    journal.unlink()
    return True


def promote(out_dir: str | os.PathLike, version: str) -> str:
    """Make versions/<version> live; the current live folders go to versions/<live version>.

    Returns the version that was live before. Every folder of the candidate must exist.
    """
    out_dir = Path(out_dir)
    vdir = versions_dir(out_dir)
    cand = vdir / version
    missing = [name for name in VERSIONED if not (cand / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{cand}: version is incomplete, missing {missing}")
    old = live_version(out_dir)
    if old == version:
        raise ValueError(f"version {version!r} is already live in {out_dir}")
    keep = vdir / old
    if keep.exists():
        shutil.rmtree(keep)
    planned = [(out_dir / n, keep / n) for n in VERSIONED if (out_dir / n).exists()]
    planned += [(cand / n, out_dir / n) for n in VERSIONED]
    journal = vdir / JOURNAL
    done: list[list[str]] = []
    write_json({"from": old, "to": version, "moves": done}, journal)
    try:
        for src, dst in planned:
            _move(src, dst)
            done.append([str(src), str(dst)])
            write_json({"from": old, "to": version, "moves": done}, journal)
    except BaseException:
        _undo(done)
        journal.unlink()
        raise
    journal.unlink()
    leftover = [p for p in cand.iterdir()] if cand.exists() else []
    if cand.exists() and not leftover:
        cand.rmdir()
    return old


def record(out_dir: str | os.PathLike, entry: dict) -> None:
    """Append one retrain decision to versions/history.json (promoted or not, and why)."""
    path = versions_dir(out_dir) / HISTORY
    history = json.loads(path.read_text()) if path.exists() else []
    write_json(history + [entry], path)


def dvc_commit(out_dir: str | os.PathLike, stages: tuple[str, ...] = RETRAIN_STAGES,
               repo: Path = ROOT) -> str:
    """`dvc commit -f` the stages a retrain touched, when out_dir is the DVC pipeline's outputs.

    Returns what happened ("committed" or why it was skipped); a DVC failure raises.
    """
    if not (repo / ".dvc").is_dir() or not (repo / DVC_FILE.name).exists():
        return f"skipped: {repo} is not a DVC project"
    if Path(out_dir).resolve() != (repo / PIPELINE_OUT).resolve():
        return f"skipped: {out_dir} is not the pipeline's {PIPELINE_OUT}/ (dvc.yaml tracks only that one)"
    cmd = [sys.executable, "-m", "dvc", "commit", "--force", *stages]
    res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return "committed"


class RetrainLock:
    """versions/RETRAIN.lock: one retrain per out_dir at a time (a stale lock of a dead process is taken over)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = versions_dir(out_dir) / "RETRAIN.lock"

    def _holder_alive(self) -> bool:
        try:
            pid = int(self.path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return False
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __enter__(self) -> "RetrainLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and not self._holder_alive():
            self.path.unlink()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise RuntimeError(f"{self.path}: another retrain of this out_dir is running") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)

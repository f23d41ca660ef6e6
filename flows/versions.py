"""Model versions under an out_dir: the live one in place, earlier ones under versions/<v>/.

A version is the set of folders a retriever needs to serve: prepared/, embeddings/,
tokenizer/, sids/, retriever/. Retraining builds a candidate in versions/<new>/; promotion
moves the live folders to versions/<old>/ and the candidate's into place. Each move is an
atomic rename. Journal before move: the whole plan goes to versions/PROMOTING.json (fsynced)
before the first rename, and the journal is deleted only after the last; while it exists the
promotion has not happened, so a process killed at any point is rolled back from the plan by
`recover` (the next retrain's first act, or `run_recover`). `promote(out_dir, old)` is also
the rollback. Promotion and recovery hold the out_dir lock (components/locks.py).
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

from components.atomic import fsync_dir, write_json
from components.config import out_path
from components.errors import Sa2crqError
from components.locks import lock_folder
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
    """Reverse the moves of a plan that were done, last first (each entry is [src, dst]).

    A move was done exactly when dst exists and src does not, so this is right after a kill
    at any point of the plan, and again after a kill during the undo itself."""
    for src, dst in reversed(moves):
        if Path(dst).exists() and not Path(src).exists():
            _move(Path(dst), Path(src))


def _sync(paths: set[Path]) -> None:
    for path in paths:
        if path.is_dir():
            fsync_dir(path)


def recover(out_dir: str | os.PathLike) -> bool:
    """Roll back a promotion that was cut short (its journal is still there); True when there was one."""
    vdir = versions_dir(out_dir)
    with lock_folder(out_dir):
        journal = vdir / JOURNAL
        if not journal.exists():
            return False
        plan = json.loads(journal.read_text())
        _undo(plan["moves"])
        _sync({Path(p).parent for move in plan["moves"] for p in move})
        journal.unlink()
        keep = vdir / plan["from"]
        if keep.is_dir() and not any(keep.iterdir()):
            keep.rmdir()
        return True


def run_recover(params: dict) -> dict:
    """`sa2crq recover`: roll back an interrupted promotion in params' out_dir."""
    out_dir = out_path(params)
    recovered = recover(out_dir)
    return {"out_dir": str(out_dir), "recovered": recovered,
            "live": live_version(out_dir) if (out_dir / "sids" / "meta.json").exists() else None}


def promote(out_dir: str | os.PathLike, version: str) -> str:
    """Make versions/<version> live; the current live folders go to versions/<live version>.

    Returns the version that was live before. Every folder of the candidate must exist.
    """
    out_dir = Path(out_dir)
    vdir = versions_dir(out_dir)
    cand = vdir / version
    with lock_folder(out_dir):
        recover(out_dir)
        missing = [name for name in VERSIONED if not (cand / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"{cand}: version is incomplete, missing {missing}")
        old = live_version(out_dir)
        if old == version:
            raise Sa2crqError(f"{out_dir}: version {version!r} is already live")
        keep = vdir / old
        if keep.exists():
            shutil.rmtree(keep)
        moves = [(out_dir / n, keep / n) for n in VERSIONED if (out_dir / n).exists()]
        moves += [(cand / n, out_dir / n) for n in VERSIONED]
        plan = [[str(src), str(dst)] for src, dst in moves]
        journal = vdir / JOURNAL
        write_json({"from": old, "to": version, "moves": plan}, journal, durable=True)
        try:
            for src, dst in moves:
                _move(src, dst)
            _sync({out_dir, keep, cand})
        except BaseException:
            _undo(plan)
            journal.unlink()
            raise
        journal.unlink()
        fsync_dir(vdir)
        if cand.exists() and not any(cand.iterdir()):
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

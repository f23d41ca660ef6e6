"""Model versions under an out_dir: the live one in place, earlier ones under versions/<v>/.

A version is the set of folders a retriever needs to serve: prepared/, embeddings/,
tokenizer/, sids/, retriever/. Retraining builds a candidate in versions/<new>/; promotion
moves the live folders to versions/<old>/ and the candidate's into place, then records it in
the model registry (flows/registry.py: GTO tags `retriever@<v>` / `retriever#prod`, dvc.lock
rewritten to describe the live files and committed). The registry is the record of which
version is prod and where its bytes are; versions/<v>/ is the quick local byte store.

Crash safety: each move is an atomic rename, and the whole plan goes to versions/PROMOTING.json
(fsynced) before the first one. While the journal says `moved: false`, the promotion has not
happened: `recover` (the next retrain's or promotion's first act, or `sa2crq recover`) puts
every live folder back. Once every rename is done the journal says `moved: true`, and `recover`
finishes the registry record instead (its steps are idempotent). The journal goes last.
`promote(out_dir, old)` is also the rollback (`prod` assigned back to the earlier version).
Promotion and recovery hold the out_dir lock (components/runtime/locks.py).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from components.runtime.atomic import fsync_dir, write_json
from components.runtime.config import out_path
from components.runtime.errors import Sa2crqError
from components.runtime.locks import lock_folder
from components.tokenizers.sid_table import live_version
from flows.registry import VERSIONED, Registry, prod_version, record_live, registry_for, show
from flows.step_io import ROOT

JOURNAL = "PROMOTING.json"
HISTORY = "history.json"


def versions_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "versions"


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


def recover(out_dir: str | os.PathLike, root: Path = ROOT) -> bool:
    """Finish or roll back a promotion that was cut short (its journal is still there); True when there was one.

    Before the last rename (`moved: false`) the moves are undone; after it the registry record of
    the new version is completed. Either way the registry then names the live version as prod."""
    vdir = versions_dir(out_dir)
    with lock_folder(out_dir):
        journal = vdir / JOURNAL
        if not journal.exists():
            return False
        plan = json.loads(journal.read_text())
        if not plan.get("moved"):
            _undo(plan["moves"])
            _sync({Path(p).parent for move in plan["moves"] for p in move})
        record_live(registry_for(out_dir, root), live_version(out_dir),
                    "recovered" if plan.get("moved") else "kept (promotion rolled back)")
        journal.unlink()
        for left in (vdir / plan["from"], vdir / plan["to"]):
            if left.is_dir() and not any(left.iterdir()):
                left.rmdir()
        return True


def run_recover(params: dict) -> dict:
    """`sa2crq recover`: finish or roll back an interrupted promotion in params' out_dir."""
    out_dir = out_path(params)
    recovered = recover(out_dir)
    return {"out_dir": str(out_dir), "recovered": recovered,
            "live": live_version(out_dir) if (out_dir / "sids" / "meta.json").exists() else None}


def promote(out_dir: str | os.PathLike, version: str, root: Path = ROOT) -> str:
    """Make versions/<version> live and prod; the current live folders go to versions/<live version>.

    Returns the version that was live before. Every folder of the candidate must exist. The live
    version is registered first (the first promotion of an out_dir registers what the pipeline
    built), so a rollback to it is an assignment of prod like any other.
    """
    out_dir = Path(out_dir)
    vdir = versions_dir(out_dir)
    cand = vdir / version
    with lock_folder(out_dir):
        recover(out_dir, root)
        if not cand.is_dir():
            kept = sorted(p.name for p in vdir.iterdir() if p.is_dir()) if vdir.is_dir() else []
            raise FileNotFoundError(f"{cand}: no such version; kept versions: {kept or 'none'} (`sa2crq versions`)")
        missing = [name for name in VERSIONED if not (cand / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"{cand}: version is incomplete, missing {missing}")
        old = live_version(out_dir)
        if old == version:
            raise Sa2crqError(f"{out_dir}: version {version!r} is already live")
        reg = registry_for(out_dir, root)
        record_live(reg, old)
        keep = vdir / old
        if keep.exists():
            shutil.rmtree(keep)
        moves = [(out_dir / n, keep / n) for n in VERSIONED if (out_dir / n).exists()]
        moves += [(cand / n, out_dir / n) for n in VERSIONED]
        plan = {"from": old, "to": version, "moves": [[str(src), str(dst)] for src, dst in moves], "moved": False}
        journal = vdir / JOURNAL
        write_json(plan, journal, durable=True)
        try:
            for src, dst in moves:
                _move(src, dst)
            _sync({out_dir, keep, cand})
        except BaseException:
            _undo(plan["moves"])
            journal.unlink()
            raise
        write_json({**plan, "moved": True}, journal, durable=True)
        _register(reg, version)
        journal.unlink()
        fsync_dir(vdir)
        if cand.exists() and not any(cand.iterdir()):
            cand.rmdir()
        return old


def _register(reg: Registry, version: str) -> None:
    """The registry step of a promotion (a seam for the tests that kill a promotion inside it)."""
    record_live(reg, version, "promoted")


def run_promote(params: dict, opt_version: str) -> dict:
    """`sa2crq promote VERSION`: make a kept version live and prod (a rollback when it is an earlier one)."""
    out_dir = out_path(params)
    previous = promote(out_dir, opt_version)
    return {"out_dir": str(out_dir), "live": live_version(out_dir), "previous": previous,
            "registry": show_versions(out_dir)}


def show_versions(out_dir: str | os.PathLike, root: Path = ROOT) -> dict:
    """The registry of out_dir: where it is, the prod version, every registered version."""
    reg = registry_for(out_dir, root)
    return {"repo": str(reg.repo), "prod": prod_version(reg), "versions": show(reg)}


def run_versions(params: dict) -> dict:
    """`sa2crq versions`: the live version of params' out_dir and its registry (GTO)."""
    out_dir = out_path(params)
    live = live_version(out_dir) if (out_dir / "sids" / "meta.json").exists() else None
    return {"out_dir": str(out_dir), "live": live, **show_versions(out_dir)}


def record(out_dir: str | os.PathLike, entry: dict) -> None:
    """Append one retrain decision to versions/history.json (promoted or not, and why)."""
    path = versions_dir(out_dir) / HISTORY
    history = json.loads(path.read_text()) if path.exists() else []
    write_json(history + [entry], path)

"""Model versions under an out_dir: the live one in place, earlier ones under versions/<v>/.

A version is the set of folders a retriever needs to serve: prepared/, embeddings/,
tokenizer/, sids/, retriever/. Retraining builds a candidate in versions/<new>/; promotion
moves the live folders to versions/<old>/ and the candidate's into place, then records it in
the model registry (components/lifecycle/registry.py: GTO tags `retriever@<v>` / `retriever#prod`, dvc.lock
rewritten to describe the live files and committed). The registry is the record of which
version is prod and where its bytes are; versions/<v>/ is the quick local byte store.

Crash safety: each move is an atomic rename, and the whole plan goes to versions/PROMOTING.json
(fsynced) before the first one. While the journal says `moved: false`, the promotion has not
happened: `recover` (the next retrain's or promotion's first act, or `sa2crq recover`) puts
every live folder back. Once every rename is done the journal says `moved: true`, and `recover`
finishes the registry record instead (its steps are idempotent). The journal goes last.
`promote(out_dir, old)` is also the rollback (`prod` assigned back to the earlier version).
Promotion and recovery hold the out_dir lock (components/runtime/locks.py).

Versions are immutable and named safely:
- a version name is checked (components/lifecycle/registry.py `check_version_name`) before anything moves: never a
  path; `recover` refuses a journal whose moves are not the plan's own folders of out_dir;
- a retrain's candidate takes the next free `.r<N>` (`next_version`): above every name in
  versions/, in the registry and in versions/history.json, leftovers of killed retrains included;
- a promotion checks the candidate: a registered version's files must match its registration
  (manifest or dvc.lock md5s), always; a candidate that never passed the retrain checks
  (`UNCHECKED.json`: a retrain began it and never finished its checks; `NOT_PROMOTED.json`: it
  failed them; or no `retriever/retrain_checks.json` record of a pass and never registered) is
  promoted only with `force`, and the registry's message and the output say so. These markers stay
  in versions/<v>/ while v is live, so the version stays recognisable after a rollback.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from components.lifecycle.registry import (
    VERSIONED,
    Registry,
    check_version_name,
    prod_version,
    record_live,
    registered_mismatch,
    registered_names,
    registry_for,
    show,
)
from components.runtime.atomic import fsync_dir, write_json
from components.runtime.errors import Sa2crqError
from components.runtime.locks import lock_folder
from components.runtime.paths import ROOT, out_path
from components.tokenizers.sid_table import live_version

JOURNAL = "PROMOTING.json"
HISTORY = "history.json"
UNCHECKED = "UNCHECKED.json"            # versions/<v>/: a retrain began this candidate, its checks have not passed
NOT_PROMOTED = "NOT_PROMOTED.json"      # versions/<v>/: the candidate failed its checks (why)
CHECKS_RECORD = "retrain_checks.json"   # versions/<v>/retriever/: the checks it passed (moves with the model)


def versions_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "versions"


def _retrain_number(name: str) -> tuple[str, int]:
    """(`<root>`, N) of `<root>.r<N>`; (name, 0) for a name that is no retrain."""
    root, _, n = name.rpartition(".r")
    return (root, int(n)) if root and n.isdigit() else (name, 0)


def _history(out_dir: str | os.PathLike) -> list[dict]:
    path = versions_dir(out_dir) / HISTORY
    if not path.exists():
        return []
    try:
        history = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Sa2crqError(f"{path}: unreadable retrain history ({exc})") from None
    if not isinstance(history, list):
        raise Sa2crqError(f"{path}: unreadable retrain history (not a list)")
    return history


def next_version(out_dir: str | os.PathLike, current: str, root: Path = ROOT) -> str:
    """`<root>.r<N>` for the next retrain of the live version `current`: retrains of one tokenizer
    build are numbered in order, and N is above every number any name of that root ever took, in
    versions/ (kept versions, candidates, a killed retrain's leftover), the registry and
    versions/history.json. A name is never reused, so no kept or registered version is overwritten."""
    stem = _retrain_number(check_version_name(current))[0]
    vdir = versions_dir(out_dir)
    taken = {current, *(p.name for p in vdir.iterdir())} if vdir.is_dir() else {current}
    taken |= registered_names(registry_for(out_dir, root))
    taken |= {str(entry.get(key)) for entry in _history(out_dir) if isinstance(entry, dict)
              for key in ("candidate", "previous", "live")}
    n = max(num for name in taken for s, num in [_retrain_number(name)] if s == stem)
    return check_version_name(f"{stem}.r{n + 1}")


def begin_candidate(cand: Path, record: dict) -> None:
    """Create versions/<v>/ with its UNCHECKED marker first (fsynced), before any of its folders: a
    retrain killed at any later point leaves a candidate that cannot be promoted without --force."""
    if cand.exists():
        raise Sa2crqError(f"{cand}: already exists; a retrain never writes over a kept version")
    cand.mkdir(parents=True)
    write_json(record, cand / UNCHECKED, durable=True)


def end_candidate(cand: Path, result: dict, passed: bool) -> None:
    """Record the checks' outcome, then remove the UNCHECKED marker (a kill in between leaves both:
    still unchecked). Passed: retriever/retrain_checks.json; failed: NOT_PROMOTED.json saying why."""
    if passed:
        write_json({**result, "passed": True}, cand / "retriever" / CHECKS_RECORD, durable=True)
    else:
        write_json(result, cand / NOT_PROMOTED, durable=True)
    (cand / UNCHECKED).unlink(missing_ok=True)
    fsync_dir(cand)


def unchecked_reason(reg: Registry, cand: Path, version: str) -> str | None:
    """Why versions/<version> may not be promoted without --force (None: it may).

    Raises Sa2crqError, force or not, when a registered version's files differ from its
    registration: promoting it would make the registry name bytes it never recorded."""
    changed = registered_mismatch(reg, version, cand)
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise Sa2crqError(f"{cand}: its files differ from the registered version {version!r} ({shown}); "
                          f"refusing to promote them under that name (`gto show` names the registered commit)")
    if (cand / UNCHECKED).exists():
        why = _field(cand / UNCHECKED, "why") or "its retrain stopped before the checks finished"
        return f"it never passed the retrain checks ({why}; {UNCHECKED})"
    if (cand / NOT_PROMOTED).exists():
        return f"it failed the retrain checks ({_field(cand / NOT_PROMOTED, 'reason') or 'see ' + NOT_PROMOTED})"
    if changed is None and _field(cand / "retriever" / CHECKS_RECORD, "passed") is not True:
        return f"it never passed the retrain checks (not registered, and no retriever/{CHECKS_RECORD})"
    return None


def _field(path: Path, key: str) -> object:
    """One field of a marker file; None when the file or the field is missing or unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record.get(key) if isinstance(record, dict) else None


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


def _checked_plan(journal: Path, out_dir: Path) -> dict:
    """The journal's plan, refused (one line, nothing moved) unless every move is between a live
    folder of out_dir and the same folder of versions/<from> or versions/<to>: a journal that
    names any other path (`../..`, an absolute path elsewhere) is not one a promotion wrote."""
    try:
        plan = json.loads(journal.read_text())
        names = (check_version_name(plan["from"]), check_version_name(plan["to"]))
        moves = [(str(src), str(dst)) for src, dst in plan["moves"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, Sa2crqError) as exc:
        raise Sa2crqError(f"{journal}: not a promotion journal ({exc}); nothing was moved, inspect it "
                          "before removing it") from None
    allowed = {out / sub for out in {Path(os.path.abspath(out_dir)), out_dir.resolve()}
               for sub in [*VERSIONED, *(Path("versions", v, n) for v in names for n in VERSIONED)]}
    for src, dst in moves:
        outside = [p for p in (src, dst) if Path(os.path.abspath(p)) not in allowed]
        if outside:
            raise Sa2crqError(f"{journal}: the move {src} -> {dst} leaves the folders of {out_dir} "
                              f"({outside[0]}); refusing to recover, nothing was moved")
    return {**plan, "moves": [list(m) for m in moves]}


def recover(out_dir: str | os.PathLike, root: Path = ROOT) -> bool:
    """Finish or roll back a promotion that was cut short (its journal is still there); True when there was one.

    Before the last rename (`moved: false`) the moves are undone; after it the registry record of
    the new version is completed. Either way the registry then names the live version as prod.
    A journal whose moves leave out_dir's folders is refused before anything moves."""
    vdir = versions_dir(out_dir)
    with lock_folder(out_dir):
        journal = vdir / JOURNAL
        if not journal.exists():
            return False
        plan = _checked_plan(journal, Path(out_dir))
        if not plan.get("moved"):
            _undo(plan["moves"])
            _sync({Path(p).parent for move in plan["moves"] for p in move})
        record_live(registry_for(out_dir, root), live_version(out_dir),
                    f"recovered ({plan.get('what', 'promoted')})" if plan.get("moved") else "kept (promotion rolled back)")
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


def kept_versions(out_dir: str | os.PathLike) -> list[str]:
    """The versions kept under versions/ (folders holding a version's folders; markers alone are not one)."""
    vdir = versions_dir(out_dir)
    return sorted(p.name for p in vdir.iterdir() if p.is_dir() and any((p / n).is_dir() for n in VERSIONED)) \
        if vdir.is_dir() else []


def promote(out_dir: str | os.PathLike, version: str, root: Path = ROOT, force: bool = False) -> str:
    """Make versions/<version> live and prod; the current live folders go to versions/<live version>.

    Returns the version that was live before. The name is checked before anything moves; every
    folder of the candidate must exist, its SIDs must carry its name, and it must pass
    `unchecked_reason` (or `force`). The live version is registered first (the first promotion of an
    out_dir registers what the pipeline built), so a rollback to it is an assignment of prod like
    any other.
    """
    return _promote(out_dir, version, root, force)[0]


def _promote(out_dir: str | os.PathLike, version: str, root: Path, force: bool) -> tuple[str, str | None]:
    """promote(), plus why the candidate needed --force (None when it did not)."""
    check_version_name(version)
    out_dir = Path(out_dir)
    vdir = versions_dir(out_dir)
    cand = vdir / version
    with lock_folder(out_dir):
        recover(out_dir, root)
        if not any((cand / n).is_dir() for n in VERSIONED):
            kept = kept_versions(out_dir)
            raise FileNotFoundError(f"{cand}: no such version; kept versions: {kept or 'none'} (`sa2crq versions`)")
        missing = [name for name in VERSIONED if not (cand / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"{cand}: version is incomplete, missing {missing}")
        if live_version(cand) != version:
            raise Sa2crqError(f"{cand / 'sids' / 'meta.json'}: its SIDs are version {live_version(cand)!r}, "
                              f"not {version!r}; a kept version is not renamed")
        old = check_version_name(live_version(out_dir))
        if old == version:
            raise Sa2crqError(f"{out_dir}: version {version!r} is already live")
        keep = vdir / old
        taken = [n for n in VERSIONED if (keep / n).exists()]
        if taken:
            raise Sa2crqError(f"{keep}: already holds {taken}, so the live version {old!r} cannot be kept there; "
                              "move that folder aside first")
        reg = registry_for(out_dir, root)
        unchecked = unchecked_reason(reg, cand, version)
        if unchecked and not force:
            raise Sa2crqError(f"{cand}: {unchecked}; `sa2crq promote {version} --force` promotes it anyway")
        if unchecked and not (cand / UNCHECKED).exists() and not (cand / NOT_PROMOTED).exists():
            # stays in versions/<v>/ while it is live: after a rollback it needs --force again
            write_json({"candidate": version, "why": f"promoted with --force: {unchecked}"}, cand / UNCHECKED,
                       durable=True)
        record_live(reg, old)
        moves = [(out_dir / n, keep / n) for n in VERSIONED if (out_dir / n).exists()]
        moves += [(cand / n, out_dir / n) for n in VERSIONED]
        plan = {"from": old, "to": version, "moves": [[os.path.abspath(src), os.path.abspath(dst)] for src, dst in moves],
                "moved": False, "what": f"promoted with --force: {unchecked}" if unchecked else "promoted"}
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
        _register(reg, plan)
        journal.unlink()
        fsync_dir(vdir)
        if cand.exists() and not any(cand.iterdir()):
            cand.rmdir()
        return old, unchecked


def _register(reg: Registry, plan: dict) -> None:
    """The registry step of a promotion: its new version prod, with what the plan says of it (a
    seam for the tests that kill a promotion inside it)."""
    record_live(reg, plan["to"], plan["what"])


def run_promote(params: dict, opt_version: str, opt_force: bool = False) -> dict:
    """`sa2crq promote VERSION [--force]`: make a kept version live and prod (a rollback when it is an earlier one)."""
    out_dir = out_path(params)
    previous, unchecked = _promote(out_dir, opt_version, ROOT, opt_force)
    result = {"out_dir": str(out_dir), "live": live_version(out_dir), "previous": previous,
              "registry": show_versions(out_dir)}
    if unchecked:
        result["forced"] = f"promoted with --force although {unchecked}"
    return result


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

"""The model registry: GTO git tags name each version of the `retriever` artifact and which is `prod`.

Why GTO and DVC rather than a hand-written record: GTO stores versions and stages as git tags
(`retriever@v0.0.3+<sid version>`, `retriever#prod#N`) on the commit whose dvc.lock names the
version's files, so `gto show`, `gto history`, `dvc artifacts get` and a plain
`git checkout retriever@v... -- dvc.lock && dvc checkout` all read the same record, and the files
of every registered version come back byte for byte from the DVC cache (or remote, after
`dvc push`). `dvc.yaml` declares the artifact (`artifacts: retriever`).

Recording a live version (`record_live`, idempotent, run by promotion and recovery):
1. dvc.lock is made to describe the live files (`dvc commit --force` of the stages whose outs are
   the versioned folders). This happens on every promotion and rollback, so `dvc status` reports
   those stages up to date and a later `dvc repro` never retrains over the promoted model; only
   `evaluate` (whose metrics still describe the previous model) is left to rerun.
2. dvc.lock is committed alone (`git commit --only`; the user's other staged changes stay staged).
3. A version not registered yet is registered at that commit: the next patch number, with the SID
   version as SemVer build metadata, so `gto show` names both.
4. `prod` is assigned to it and unassigned from any other version: exactly one version is prod,
   and a rollback is an assignment of `prod` to an earlier version.

Where the registry lives: for the DVC project's `outputs/` (dvc.yaml's out_dir) in a git checkout,
it is the project's own repository. Any other out_dir (tests, scratch runs), or a project that is
not a git checkout, gets a small git repository of its own in `<out_dir>/registry/`, where a
manifest (`retriever.json`: the version and the md5 of every file of the live folders) takes
dvc.lock's place in the commits; there `<out_dir>/versions/<v>/` is the byte store. dvc.lock is
still kept consistent when out_dir is the project's `outputs/` without git.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from components.runtime.atomic import write_json
from components.runtime.errors import Sa2crqError
from components.runtime.paths import DVC_FILE, PIPELINE_OUT, ROOT

ARTIFACT = "retriever"
STAGE = "prod"
VERSIONED = ("prepared", "embeddings", "tokenizer", "sids", "retriever")
MANIFEST = f"{ARTIFACT}.json"
FALLBACK_DIR = "registry"
# the identity of commits and tags in a fallback registry (a repository only sa2crq writes)
FALLBACK_USER = ("sa2crq registry", "sa2crq@localhost")
_BUILD = re.compile(r"^[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*$")   # SemVer build metadata
NAME_MAX = 100   # a version name is one folder name and part of a git tag: far below both limits


@dataclass(frozen=True)
class Registry:
    """Where one out_dir's versions are recorded."""

    out_dir: Path
    repo: Path                 # the git repository holding the GTO tags
    dvc_root: Path | None      # the DVC project whose dvc.lock tracks out_dir, if any

    @property
    def tracked(self) -> Path:
        """The file each registered commit holds for its version (dvc.lock, or the manifest)."""
        return self.dvc_root / "dvc.lock" if self.repo == self.dvc_root else self.repo / MANIFEST


def registry_for(out_dir: str | os.PathLike, root: Path = ROOT) -> Registry:
    """The project's repository for its `outputs/`; `<out_dir>/registry/` otherwise (module docstring)."""
    out_dir = Path(out_dir)
    is_dvc_out = ((root / ".dvc").is_dir() and (root / DVC_FILE.name).exists()
                  and out_dir.resolve() == (root / PIPELINE_OUT).resolve())
    dvc_root = root if is_dvc_out else None
    repo = root if is_dvc_out and (root / ".git").exists() else out_dir / FALLBACK_DIR
    return Registry(out_dir, repo, dvc_root)


def _run(cmd: list[str], cwd: Path) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise Sa2crqError(f"{cwd}: `{' '.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()[-1500:]}")
    return res.stdout.strip()


def _git(reg: Registry, *args: str) -> str:
    return _run(["git", *args], reg.repo)


def versioned_stages(root: Path) -> list[str]:
    """The dvc.yaml stages whose outs lie in the versioned folders (what a promotion replaces)."""
    stages = (yaml.safe_load((root / DVC_FILE.name).read_text()) or {}).get("stages", {})
    folders = tuple(f"{PIPELINE_OUT}/{name}" for name in VERSIONED)

    def ours(out: object) -> bool:
        path = str(next(iter(out)) if isinstance(out, dict) else out)
        return any(path == f or path.startswith(f + "/") for f in folders)

    return [name for name, stage in stages.items() if any(ours(o) for o in stage.get("outs") or [])]


def check_version_name(version: object) -> str:
    """A version name is GTO's SemVer build suffix and one plain folder name under versions/,
    never a path (`../x`, `/abs`, `a/b`, `..`, empty): checked before anything moves."""
    if not isinstance(version, str) or len(version) > NAME_MAX or not _BUILD.match(version):
        raise Sa2crqError(f"version {version!r}: not a version name (letters, digits and '-', in parts joined by "
                          f"single dots, at most {NAME_MAX} characters; never a path)")
    return version


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> dict[str, str]:
    """md5 of every file of the versioned folders under folder (the live out_dir or versions/<v>/)."""
    return {p.relative_to(folder).as_posix(): _md5(p) for name in VERSIONED if (folder / name).is_dir()
            for p in sorted((folder / name).rglob("*")) if p.is_file()}


def _dir_md5(folder: Path) -> str:
    """DVC's hash of a folder out (`<md5>.dir` in dvc.lock), from dvc_data's own tree."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    tree = Tree()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            tree.add(p.relative_to(folder).parts, None, HashInfo("md5", _md5(p)))
    tree.digest()
    return tree.hash_info.value


def _write_state(reg: Registry, version: str) -> None:
    """Make the tracked file describe the live folders: dvc.lock by `dvc commit`, or the manifest."""
    if reg.dvc_root is not None:
        _run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet", *versioned_stages(reg.dvc_root)],
             reg.dvc_root)
    if reg.repo != reg.dvc_root:
        write_json({"artifact": ARTIFACT, "version": version, "files": _files(reg.out_dir)}, reg.tracked,
                   durable=True)


def _open(reg: Registry) -> None:
    """A fallback registry is (re)initialised on use: both commands are idempotent."""
    if reg.repo != reg.dvc_root:
        reg.repo.mkdir(parents=True, exist_ok=True)
        _git(reg, "init", "-q")
        _git(reg, "config", "user.name", FALLBACK_USER[0])
        _git(reg, "config", "user.email", FALLBACK_USER[1])


def _commit(reg: Registry, version: str, what: str) -> str:
    """Commit the tracked file alone if it changed; the commit that now names the live version."""
    rel = str(reg.tracked.relative_to(reg.repo))
    _git(reg, "add", "--", rel)
    has_head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=reg.repo,
                              capture_output=True).returncode == 0
    changed = not has_head or subprocess.run(["git", "diff", "--cached", "--quiet", "HEAD", "--", rel],
                                             cwd=reg.repo).returncode != 0
    if changed:
        _git(reg, "commit", "-q", "--only", "-m", f"registry: {ARTIFACT} {version} {what}", "--", rel)
    return _git(reg, "rev-parse", "HEAD")


def _sid_version(gto_version: str) -> str:
    return gto_version.partition("+")[2]


def _registered(reg: Registry) -> dict[str, dict]:
    """SID version -> GTO's record of it (version, commit, stages), registered versions only."""
    from gto import api
    from gto.exceptions import ArtifactNotFound

    try:
        found = api.show(str(reg.repo), ARTIFACT, registered_only=True) if (reg.repo / ".git").exists() else []
    except ArtifactNotFound:   # no tag names the artifact yet
        found = []
    return {_sid_version(v["version"]): v for v in found if _sid_version(v["version"])}


def _in_prod(reg: Registry) -> list[str]:
    """GTO versions that hold the prod stage now (one, outside a promotion cut short)."""
    from gto import api
    from gto.exceptions import ArtifactNotFound

    try:
        found = api.find_versions_in_stage(str(reg.repo), ARTIFACT, STAGE, versions_per_stage=-1) \
            if (reg.repo / ".git").exists() else None
    except ArtifactNotFound:
        found = None
    return [v.version for v in found or []]


def _semver(gto_version: str):
    from gto.versions import SemVer

    return SemVer(gto_version.partition("+")[0])


def _next(registered: dict[str, dict], version: str) -> str:
    check_version_name(version)
    known = [_semver(v["version"]) for v in registered.values()]
    base = max(known).bump_patch().version if known else "v0.0.1"
    return f"{base}+{version}"


def _wait_past_last_event(reg: Registry, gto_version: str) -> None:
    """GTO orders a version's stage tags by their timestamps, which have whole seconds, and an
    unassignment wins a tie: a version assigned prod again within the second it lost it (a quick
    rollback) would not count as prod. So such an assignment waits for the next second."""
    from gto import api

    times = [e["timestamp"].timestamp() for e in api.history(str(reg.repo), ARTIFACT)
             if e["version"] == gto_version and e["event"] in ("assignment", "unassignment")]
    if times:
        time.sleep(max(0.0, max(times) + 1 - time.time()))


def record_live(reg: Registry, version: str, what: str = "live") -> dict:
    """Record `version` (the live one) as prod: dvc.lock / manifest, commit, register, assign (idempotent)."""
    from gto import api

    _open(reg)
    _write_state(reg, version)
    commit = _commit(reg, version, what)
    registered = _registered(reg)
    if version in registered:
        gto_version = registered[version]["version"]
    else:
        gto_version = _next(registered, version)
        api.register(str(reg.repo), ARTIFACT, commit, version=gto_version,
                     message=f"sa2crq: {ARTIFACT} {version} ({reg.out_dir})")
    in_prod = _in_prod(reg)
    if gto_version not in in_prod:
        _wait_past_last_event(reg, gto_version)
        api.assign(str(reg.repo), ARTIFACT, STAGE, version=gto_version, message=f"sa2crq: {version} {what}")
    for other in in_prod:
        if other != gto_version:
            api.unassign(str(reg.repo), ARTIFACT, version=other, stage=STAGE,
                         message=f"sa2crq: {_sid_version(other)} replaced by {version}")
    return {"repo": str(reg.repo), "version": version, "gto_version": gto_version, "stage": STAGE,
            "dvc_lock": str(reg.dvc_root / "dvc.lock") if reg.dvc_root else None}


def registered_names(reg: Registry) -> set[str]:
    """The SID versions the registry has ever registered (a retrain never reuses one)."""
    return set(_registered(reg))


def _registered_files(reg: Registry, commit: str) -> dict[str, str]:
    """What the registration commit recorded for the versioned folders, path under out_dir -> md5:
    the manifest's files, or dvc.lock's outs (a folder out: DVC's `.dir` hash)."""
    text = _git(reg, "show", f"{commit}:{reg.tracked.relative_to(reg.repo).as_posix()}")
    if reg.repo != reg.dvc_root:
        return dict(json.loads(text)["files"])
    prefix = f"{PIPELINE_OUT}/"
    return {out["path"][len(prefix):]: str(out["md5"])
            for stage in (yaml.safe_load(text) or {}).get("stages", {}).values() for out in stage.get("outs") or []
            if str(out.get("path", "")).startswith(prefix) and "md5" in out
            and out["path"][len(prefix):].split("/")[0] in VERSIONED}


def registered_mismatch(reg: Registry, version: str, folder: Path) -> list[str] | None:
    """None when `version` is not registered; else the paths under folder whose bytes differ from
    what its registration recorded (missing and extra files included): [] when they all match."""
    found = _registered(reg).get(version)
    if found is None:
        return None
    expected = _registered_files(reg, found["commit_hexsha"])
    if reg.repo != reg.dvc_root:
        actual = _files(folder)
        return sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))

    def current(rel: str, md5: str) -> str | None:
        path = folder / rel
        if md5.endswith(".dir"):
            return _dir_md5(path) if path.is_dir() else None
        return _md5(path) if path.is_file() else None

    return sorted(rel for rel, md5 in expected.items() if current(rel, md5) != md5)


def prod_version(reg: Registry) -> str | None:
    """The SID version GTO names prod (None before the first promotion); refuses an ambiguous prod."""
    in_prod = _in_prod(reg)
    if len(in_prod) > 1:
        raise Sa2crqError(f"{reg.repo}: {len(in_prod)} versions of {ARTIFACT} hold {STAGE} ({in_prod}): "
                          "a promotion was cut short, run `sa2crq recover`")
    return _sid_version(in_prod[0]) if in_prod else None


def show(reg: Registry) -> list[dict]:
    """Every registered version, newest first: SID version, GTO version, commit, stages."""
    return [{"version": name, "gto_version": v["version"], "commit": v["commit_hexsha"],
             "stages": [s["stage"] for s in v["stages"]]}
            for name, v in sorted(_registered(reg).items(), key=lambda kv: _semver(kv[1]["version"]), reverse=True)]

"""What each step reads, writes and depends on, taken from dvc.yaml so flows and DVC agree.

Prefect's cache keys and the "are the outputs still there?" check both come from here:
a step is reused only when its params sections, its code and the content of its inputs
are what they were when it last ran, and its outputs still exist.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from components.config import out_path, params_hash
from components.errors import ConfigError, UnknownNameError

ROOT = Path(__file__).resolve().parents[1]
DVC_FILE = ROOT / "dvc.yaml"
PIPELINE_OUT = "outputs"          # the out_dir that dvc.yaml's paths are written for
ALWAYS_SECTIONS = ("seed", "dataset")


@dataclass(frozen=True)
class StepIO:
    """One step's inputs (relative to out_dir, the data root, or the project), params and outputs."""

    name: str
    data_deps: tuple[str, ...]     # under params data.root
    out_deps: tuple[str, ...]      # under out_dir
    code_deps: tuple[str, ...]     # under the project root
    sections: tuple[str, ...]
    outs: tuple[str, ...]          # under out_dir


def _paths(entries: list) -> list[str]:
    """dvc.yaml lists hold plain strings or one-key dicts (`path: {cache: false}`)."""
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]


def _under_out(path: str) -> str | None:
    prefix = PIPELINE_OUT + "/"
    return path[len(prefix):] if path.startswith(prefix) else None


@lru_cache(maxsize=4)
def _load(dvc_file: str) -> dict[str, StepIO]:
    stages = (yaml.safe_load(Path(dvc_file).read_text()) or {}).get("stages", {})
    steps: dict[str, StepIO] = {}
    for name, stage in stages.items():
        deps = _paths(stage.get("deps"))
        outs = _paths(stage.get("outs")) + _paths(stage.get("metrics")) + _paths(stage.get("plots"))
        params = [p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])]
        steps[name] = StepIO(
            name=name,
            data_deps=tuple(d[len("data"):].lstrip("/") for d in deps if d == "data" or d.startswith("data/")),
            out_deps=tuple(p for p in (_under_out(d) for d in deps) if p is not None),
            code_deps=tuple(d for d in deps if _under_out(d) is None and d != "data" and not d.startswith("data/")),
            sections=tuple(sorted(set(params) | set(ALWAYS_SECTIONS))),
            outs=tuple(p for p in (_under_out(o) for o in outs) if p is not None),
        )
    return steps


def require_dvc_out_dir(params: dict) -> None:
    """`sa2crq run` runs dvc.yaml, whose stages read and write outputs/ by name: another
    out_dir would run every stage into it while DVC tracks (and caches) outputs/. Refuse it."""
    out = Path(params.get("out_dir", PIPELINE_OUT))
    if os.path.normpath(out) != PIPELINE_OUT and out.resolve() != (ROOT / PIPELINE_OUT).resolve():
        raise ConfigError("out_dir", f"`sa2crq run` runs dvc.yaml, whose stages write {PIPELINE_OUT}/, not {out}/; "
                                     f"use `sa2crq stage <name> -s out_dir={out}` (or `sa2crq compare -s out_dir={out}`), "
                                     f"or change the {PIPELINE_OUT}/ paths in dvc.yaml")


def step_io(name: str) -> StepIO:
    """The dvc.yaml description of one step (UnknownNameError naming the known steps otherwise)."""
    steps = _load(str(DVC_FILE))
    if name not in steps:
        raise UnknownNameError(f"step {name!r} is not a stage of {DVC_FILE} (stages: {', '.join(steps)})")
    return steps[name]


@lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """Content hash, memoised on (path, size, mtime) so unchanged files are read once per process."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: Path) -> str:
    """Hash of a file's or a folder's content (file names included); 'missing' if absent."""
    if not path.exists():
        return "missing"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        h.update(_file_digest(str(f), st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()


def input_paths(params: dict, name: str) -> list[Path]:
    """Every input of a step as an absolute path for this params' out_dir and data root."""
    io = step_io(name)
    data_root = Path(params.get("data", {}).get("root", "data"))
    paths = [data_root / d if d else data_root for d in io.data_deps]
    paths += [out_path(params, d) for d in io.out_deps]
    paths += [ROOT / c for c in io.code_deps]
    return paths


def cache_key(params: dict, name: str) -> str:
    """Key = step + hash(params sections, input contents, code); same inputs -> same key."""
    io = step_io(name)
    h = hashlib.sha256(f"{name}|{params_hash(params, io.sections)}".encode())
    for path in input_paths(params, name):
        h.update(fingerprint(path).encode())
    return f"{name}-{h.hexdigest()[:24]}"


def outputs_present(params: dict, name: str) -> bool:
    """True when every output dvc.yaml declares for the step exists under out_dir."""
    return all(out_path(params, o).exists() for o in step_io(name).outs)

"""Read params.yaml the same way everywhere: DVC stages, Prefect flows and the CLI."""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path("params.yaml")


def deep_merge(base: dict, over: dict) -> dict:
    """Return base updated recursively by over (over wins), without touching either."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict:
    """Turn 'a.b=3' into {'a': {'b': 3}}; the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    node: dict = {}
    cur = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cur[part] = {}
        cur = cur[part]
    cur[parts[-1]] = value
    return node


def load_params(path: str | os.PathLike = DEFAULT_PARAMS, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load params.yaml, apply `key=value` overrides, then overlay the chosen profile."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: params file not found (run from the project root or pass --params)")
    params = yaml.safe_load(path.read_text()) or {}
    for text in overrides or []:
        params = deep_merge(params, parse_override(text))
    profile = params.get("profile", "default")
    profiles = params.get("profiles", {}) or {}
    if profile != "default":
        if profile not in profiles:
            raise ValueError(f"{path}: profile {profile!r} is not defined under 'profiles' (have: {sorted(profiles)})")
        params = deep_merge(params, profiles[profile])
        # explicit overrides beat the profile
        for text in overrides or []:
            params = deep_merge(params, parse_override(text))
    params["_params_path"] = str(path)
    return params


def params_hash(params: dict, sections: tuple[str, ...] | None = None) -> str:
    """Short stable hash of (some sections of) the params, for run names and cache keys."""
    view = {k: v for k, v in params.items() if not k.startswith("_") and (sections is None or k in sections)}
    blob = json.dumps(view, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def out_path(params: dict, *parts: str) -> Path:
    """A path under the run's output folder (never inside data/)."""
    return Path(params.get("out_dir", "outputs")).joinpath(*parts)

"""Read params.yaml the same way everywhere: DVC stages, Prefect flows and the CLI.

One path: `resolve_params` applies `key=value` overrides, overlays the chosen profile (the
overrides again on top: they beat the profile) and checks the result against
components/runtime/config_schema.py. `load_params` (CLI, stages) and the flows' `apply_overrides`
both go through it. OmegaConf reads the file and the override values (YAML 1.2 numbers:
`1e-3` is a float, not a string); layers merge as plain dicts (an OmegaConf merge of the
whole tree costs ~40 ms, and every profile and variant overlay is merged to be checked).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from components.runtime.config_schema import check_params
from components.runtime.errors import ConfigError, Sa2crqError

DEFAULT_PARAMS = Path("params.yaml")
KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def deep_merge(base: dict, over: dict) -> dict:
    """Return base updated recursively by over (over wins; lists are replaced), without touching either."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge(*layers: dict) -> dict:
    """The layers merged in order into a new dict (later ones win); none of them is touched."""
    return functools.reduce(deep_merge, layers, {})


def parse_override(text: str) -> dict:
    """Turn 'a.b=3' into {'a': {'b': 3}}; the value is parsed as YAML (numbers, lists, bools)."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(key.strip() or text, f"an override must look like key.path=value, got {text!r}")
    return override_layer(key.strip(), parse_value(raw, key.strip()))


def override_layer(key: str, value: Any) -> dict:
    """{'a': {'b': value}} for key 'a.b': an override as a layer to merge (sweep points pass these)."""
    if not KEY.fullmatch(key):
        raise ConfigError(key, "an override key must be dotted names, like retriever.beam")
    node: dict = {}
    cur = node
    parts = key.split(".")
    for part in parts[:-1]:
        cur[part] = {}
        cur = cur[part]
    cur[parts[-1]] = value
    return node


def parse_value(raw: str, key: str) -> Any:
    """An override's value as YAML, read by OmegaConf's loader; '' stays an empty string."""
    if raw == "":
        return ""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]))["value"]
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(key, f"cannot read {raw!r} as a YAML value: {_first_line(exc)}") from None


def resolve_params(params: dict, overrides: list[str | dict] | None = None) -> dict[str, Any]:
    """params + overrides, with the chosen profile overlaid, checked: ConfigError names the first bad key.

    `params` is params.yaml as read, or params this function returned before (their `_profile`
    says which profile is already in): a flow's `profile=smoke` override overlays the profile
    like `sa2crq -s profile=smoke` does. An override is `key=value` text or an override_layer."""
    layers = [parse_override(o) if isinstance(o, str) else o for o in overrides or []]
    out = merge(params, *layers)
    applied = params.get("_profile", "default")
    profile = out.get("profile", "default")
    if profile != applied:
        out = merge(out, _profile_overlay(out, profile, applied), *layers)
    out["_profile"] = profile
    validate_params(out)
    return out


def _profile_overlay(params: dict, profile: Any, applied: str) -> dict:
    profiles = params.get("profiles") if isinstance(params.get("profiles"), dict) else {}
    if profile != "default" and (not isinstance(profile, str) or profile not in profiles):
        raise ConfigError("profile", f"must be one of {' | '.join(['default', *profiles])}, got {profile!r}")
    if applied != "default":
        raise ConfigError("profile", f"these params already have profile {applied!r} overlaid; "
                          f"load params.yaml again (load_params) with profile={profile}")
    return profiles[profile]


def validate_params(params: dict) -> None:
    """Check every key, and each overlay (profiles, eval.variants) merged over the params."""
    check_params(params)
    for name, overlay in params["profiles"].items():
        _check_overlay(params, overlay, f"profiles.{name}")
    for i, variant in enumerate(params["eval"]["variants"]):
        _check_overlay(params, variant["params"] or {}, f"eval.variants[{i}].params")


def _check_overlay(params: dict, overlay: dict, where: str) -> None:
    for key in ("profile", "profiles"):
        if key in overlay:
            raise ConfigError(f"{where}.{key}", "an overlay cannot choose or define profiles")
    merged = merge(params, overlay)
    check_params(merged, f"{where}.")
    for i, variant in enumerate((overlay.get("eval") or {}).get("variants") or []):
        _check_overlay(merged, variant["params"] or {}, f"{where}.eval.variants[{i}].params")


def load_params(path: str | os.PathLike = DEFAULT_PARAMS, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load params.yaml, apply `key=value` overrides, overlay the chosen profile, check every key."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        raw = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise Sa2crqError(f"{path}: not readable as YAML: {_first_line(exc)}") from None
    if not isinstance(raw, DictConfig):
        raise Sa2crqError(f"{path}: must be a mapping of keys, got a {type(raw).__name__}")
    params = OmegaConf.to_container(raw)
    params["_params_path"] = str(path)
    return resolve_params(params, overrides)


def _first_line(exc: Exception) -> str:
    """What went wrong, on one line (a YAML error's own text spans several, with a caret)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        where = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
        return f"{exc.problem}{where}"
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def params_hash(params: dict, sections: tuple[str, ...] | None = None) -> str:
    """Short stable hash of (some sections of) the params, for run names and cache keys."""
    view = {k: v for k, v in params.items() if not k.startswith("_") and (sections is None or k in sections)}
    blob = json.dumps(view, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def wandb_dir(params: dict) -> Path:
    """Where W&B writes a run's files (wandb adds its own `wandb/` below): the run's out_dir, so an
    experiment in another out_dir keeps its logs with its outputs; WANDB_DIR overrides."""
    return Path(os.environ.get("WANDB_DIR") or out_path(params))


def out_path(params: dict, *parts: str) -> Path:
    """A path under the run's output folder (never inside data/)."""
    return Path(params.get("out_dir", "outputs")).joinpath(*parts)

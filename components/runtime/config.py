"""Read params.yaml the same way everywhere: DVC stages, Prefect flows and the CLI.

One path: `resolve_params` applies `key=value` overrides, overlays the chosen profile (the
overrides again on top: they beat the profile) and checks the result against
components/runtime/config_schema.py. `load_params` (CLI, stages) and the flows' `apply_overrides`
both go through it. OmegaConf's YAML loader reads the file and the override values (YAML 1.2
numbers: `1e-3` is a float, not a string), bounded (read_yaml: aliases may not expand past
MAX_YAML_NODES values); layers merge as plain dicts (an OmegaConf merge of the whole tree costs
~40 ms, and every profile and variant overlay is merged to be checked).

Precedence, lowest first: params.yaml < the active profile (`profiles.<profile>`) < `-s` overrides.
`sa2crq run -s` goes through `dvc exp run -S`, which writes params.yaml, and the stages then read
the file alone: dvc_set_params also writes the value into the active profile where it sets the key,
so the stages resolve what `load_params(path, overrides)` resolves here.
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
from omegaconf import OmegaConf
from omegaconf._utils import get_yaml_loader
from omegaconf.errors import OmegaConfBaseException

from components.runtime.config_schema import check_params
from components.runtime.errors import ConfigError, Sa2crqError

DEFAULT_PARAMS = Path("params.yaml")
KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
# Values a YAML document may hold once its aliases are expanded (each use of an alias counts its
# whole value): params.yaml holds ~1,000; a 9-level alias bomb holds 9**9 and would keep OmegaConf
# busy for minutes and gigabytes.
MAX_YAML_NODES = 100_000
# Folders (and everything below them) that out_dir may not be: writing runs, locks and temp files there
# would touch the system. "/" itself is refused, not what lies below it. /var/tmp is a temp folder.
SYSTEM_DIRS = ("/etc", "/proc", "/sys", "/dev", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
               "/boot", "/var", "/run", "/snap")
SYSTEM_DIRS_ALLOWED = ("/var/tmp",)


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
        read_yaml(raw, f"params.yaml '{key}'")   # an alias bomb in the value stops here, before OmegaConf
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
    check_out_dir(out)
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
    check_params(merged, f"{where}.", across=False)
    for i, variant in enumerate((overlay.get("eval") or {}).get("variants") or []):
        _check_overlay(merged, variant["params"] or {}, f"{where}.eval.variants[{i}].params")


def load_params(path: str | os.PathLike = DEFAULT_PARAMS, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load params.yaml, apply `key=value` overrides, overlay the chosen profile, check every key."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: params file not found (run from the project root or pass --params)")
    if path.is_dir():
        raise Sa2crqError(f"{path}: is a folder, not a params file (--params takes a YAML file)")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise Sa2crqError(f"{path}: cannot read the params file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise Sa2crqError(f"{path}: not a text file (params must be UTF-8 YAML)") from None
    try:
        params = read_yaml(text, str(path))
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise Sa2crqError(f"{path}: not readable as YAML: {_first_line(exc)}") from None
    if not isinstance(params, dict):
        raise Sa2crqError(f"{path}: must be a mapping of keys, got a {type(params).__name__}")
    try:   # OmegaConf's checks on the tree (keys must be strings, ...) as before
        params = OmegaConf.to_container(OmegaConf.create(params))
    except OmegaConfBaseException as exc:
        raise Sa2crqError(f"{path}: not readable as params: {_first_line(exc)}") from None
    params["_params_path"] = str(path)
    return resolve_params(params, overrides)


def dvc_set_params(path: str | os.PathLike, sets: list[str]) -> list[str]:
    """The `dvc exp run -S` settings under which path's params resolve as `load_params(path, sets)` does.

    DVC writes each setting into the file and the stages read the file alone, where the active
    profile overlays the base keys: a set key the profile also sets (or sets below) would lose to
    it. Such a key is set inside the profile too (`profiles.<profile>.<key>=<value>`). Checked by
    applying the settings to a copy of the file as DVC does: Sa2crqError if DVC cannot apply
    them, ConfigError naming the first key the stages would still resolve differently."""
    wanted = load_params(path, sets)
    profile = wanted["profile"]
    overlay = wanted["profiles"].get(profile, {}) if profile != "default" else {}
    out = list(sets)
    for text in sets:
        key, _, raw = text.partition("=")
        if _sets_key(overlay, key.strip().split(".")):
            out.append(f"profiles.{profile}.{key.strip()}={raw}")
    _check_dvc_sets(Path(path), out, wanted)
    return out


def _sets_key(overlay: dict, parts: list[str]) -> bool:
    """Whether the overlay holds a value at this key path (the key or keys below it)."""
    node: Any = overlay
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _check_dvc_sets(path: Path, sets: list[str], wanted: dict) -> None:
    """Apply sets to a copy of path with DVC's own code (dvc.utils: the -S parsing and hydra overrides)
    and compare what the stages would resolve with `wanted`."""
    import tempfile

    from dvc.exceptions import DvcException
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    from components.runtime.resolved_params import resolved_view

    with tempfile.TemporaryDirectory(prefix="sa2crq-dvc-set-") as tmp:
        copy = Path(tmp) / "params.yaml"
        copy.write_bytes(path.read_bytes())
        try:
            for _, overrides in to_path_overrides(sets).items():
                apply_overrides(copy, overrides)
        except DvcException as exc:
            cause = exc.__cause__ or exc
            raise Sa2crqError(f"dvc exp run -S cannot apply {' '.join(sets)}: {_first_line(cause)}") from None
        got = load_params(copy)
    mine, theirs = resolved_view(wanted), resolved_view(got)
    if mine != theirs:
        key, want_value, got_value = _first_difference(mine, theirs)
        raise ConfigError(key, f"is {want_value!r} here but `dvc exp run -S` would give the stages {got_value!r}; "
                               "write the value in the YAML form both read (e.g. quote a string)")


def _first_difference(mine: Any, theirs: Any, key: str = "") -> tuple[str, Any, Any]:
    """(dotted key, mine, theirs) of the first leaf where two trees differ (they must differ)."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for sub in [*mine, *(k for k in theirs if k not in mine)]:
            if mine.get(sub) != theirs.get(sub):
                return _first_difference(mine.get(sub), theirs.get(sub), f"{key}.{sub}" if key else str(sub))
    return key, mine, theirs


def read_yaml(text: str, where: str) -> Any:
    """YAML text as Python values, by OmegaConf's loader, refusing before anything is built a
    document whose aliases expand past MAX_YAML_NODES values or contain themselves (Sa2crqError
    naming `where`). yaml.YAMLError for text that is not YAML."""
    loader = get_yaml_loader()(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            _expanded_size(node, {}, set(), where)
        except RecursionError:
            raise Sa2crqError(f"{where}: YAML nested too deeply") from None
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int], where: str) -> int:
    """Values under node with every alias expanded (memoized per node, so a bomb costs its text size)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise Sa2crqError(f"{where}: a YAML alias refers to the value that contains it")
    open_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    size = 1
    for child in children:
        size += _expanded_size(child, sizes, open_nodes, where)
        if size > MAX_YAML_NODES:
            raise Sa2crqError(f"{where}: YAML aliases expand to more than {MAX_YAML_NODES:,} values "
                              "(an alias bomb?); write the values out")
    open_nodes.discard(id(node))
    sizes[id(node)] = size
    return size


def check_out_dir(params: dict) -> None:
    """ConfigError unless out_dir is a folder runs may write: not a system folder (SYSTEM_DIRS) and not
    inside data.root (DVC tracks data/); paths compared resolved (links, `..`)."""
    raw = params.get("out_dir", "outputs")
    out = Path(raw).resolve()
    shown = f"{raw}" if str(out) == str(raw) else f"{raw} (= {out})"
    system = [d for d in SYSTEM_DIRS if out.is_relative_to(d) and not any(out.is_relative_to(a)
                                                                             for a in SYSTEM_DIRS_ALLOWED)]
    if out == Path(out.anchor) or system:
        raise ConfigError("out_dir", f"{shown} is a system folder; runs write there (outputs, a lock, temp "
                                     "files): choose a folder of your own, e.g. outputs")
    data_root = (params.get("data") or {}).get("root")
    if isinstance(data_root, str) and data_root and out.is_relative_to(Path(data_root).resolve()):
        raise ConfigError("out_dir", f"{shown} is inside data.root {data_root}/, which holds the input data "
                                     "(DVC-tracked): choose a folder outside it, e.g. outputs")


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

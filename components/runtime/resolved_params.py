"""The params as the steps run with them (profile overlaid), written for DVC to read per key.

params.yaml holds layers: the base values and the profiles that overlay them. A stage that
listed params.yaml keys would have to list whole `profiles` blocks (editing the smoke profile
would rerun every stage under the default profile) or miss an overlaid value. So the first
DVC stage, `resolve_params`, writes `<out_dir>/params.resolved.yaml` from params.yaml through
`load_params` (the same path every step loads its params by), and each later stage lists the
keys it reads from that file: it reruns when a value it runs with changes, whichever layer set it.
"""
from __future__ import annotations

from typing import Any

import yaml

from components.runtime.atomic import atomic_path
from components.runtime.locks import lock_out_dir
from components.runtime.paths import out_path

RESOLVED_FILE = "params.resolved.yaml"


def resolved_view(params: dict) -> dict[str, Any]:
    """The resolved params without the profile definitions (already applied) and private keys."""
    return {k: v for k, v in params.items() if k != "profiles" and not k.startswith("_")}


def run_resolve_params(params: dict) -> dict:
    """Write params.resolved.yaml under out_dir (atomically, holding the out_dir lock)."""
    path = out_path(params, RESOLVED_FILE)
    with lock_out_dir(params):
        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(resolved_view(params), sort_keys=False, allow_unicode=True))
    return {"resolved_params": str(path), "profile": params.get("profile", "default")}

"""Registered extensions, per kind: datasets, tokenizer methods, baselines, fusion sources, group orders.

Why here: the params schema (this layer) checks `tokenizer.method`, `eval.baselines` and friends
against the registered names, and runtime may not import the layers above it. Each kind's typed
registry (components/tokenizers/registry.py, components/baselines/registry.py,
components/retrieval/rankings.py) stores its entries here, and a kind names the module whose import
registers its built-ins (HOMES), imported by name the first time the kind is read: a name is declared
once, where it lives, and checking params imports only those light modules (what runs an extension is
imported when it runs: `resolve`).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# kind -> the module whose import registers the built-in extensions of that kind
HOMES: dict[str, str] = {
    "dataset": "components.data.adapters",
    "tokenizer_method": "components.tokenizers.builtin",
    "baseline": "components.baselines.registry",
    "fusion_source": "components.retrieval.rankings",
    "group_order": "components.retrieval.rankings",
}
_ENTRIES: dict[str, dict[str, Any]] = {kind: {} for kind in HOMES}


def _kind(kind: str) -> dict[str, Any]:
    if kind not in _ENTRIES:
        raise KeyError(f"unknown extension kind {kind!r}; one of {list(_ENTRIES)}")
    return _ENTRIES[kind]


def register(kind: str, name: str, entry: Any) -> None:
    """Add `name` of `kind` (registration order is the order of choices, rows and docs); a name
    registered twice is a programming error (a typo must not shadow a built-in silently)."""
    entries = _kind(kind)
    if name in entries:
        raise ValueError(f"{kind} {name!r} is registered already")
    entries[name] = entry


def unregister(kind: str, name: str) -> None:
    """Drop a registration (one made for a while, e.g. by a test)."""
    del _kind(kind)[name]


def _loaded(kind: str) -> dict[str, Any]:
    entries = _kind(kind)
    importlib.import_module(HOMES[kind])
    return entries


def names(kind: str) -> tuple[str, ...]:
    """The registered names of `kind`, the built-in ones first (their module is imported on first use)."""
    return tuple(_loaded(kind))


def entry(kind: str, name: str) -> Any:
    """What `name` registered (KeyError when nothing did)."""
    return _loaded(kind)[name]


def resolve(target: str | Callable) -> Callable:
    """A callable, or a 'package.module:function' reference imported now (kept as text in a
    registration, so that knowing a name does not import the code behind it)."""
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)

"""Tokenizer methods by registration: each method is one `register(TokenizerMethod(...))`; the
tokenizer steps, the params schema's choices, `compare`'s run keys and the docs table read the
registrations (docs/EXTENDING.md). The built-in ones: components/tokenizers/builtin.py.

A method is its train_head hook plus switches of the shared machinery (components/tokenizers/
tokenizer_stages.py): a Stage 2 (`train_tail`), adaptive SID lengths (SARQ), TIGER's collision token,
its own assign_ids (else the frozen tokenizer encodes every item). A hook is a callable or a
'package.module:function' reference, imported when the step runs, so knowing the names (checking
params) imports no torch; hooks receive the step's context (tokenizer_stages.HeadRun, TailRun, AssignRun).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from components.runtime import extensions

KIND = "tokenizer_method"   # its built-ins: components/tokenizers/builtin.py (extensions.HOMES)
Hook = Callable[[Any], Any] | str


@dataclass(frozen=True)
class TokenizerMethod:
    """One tokenizer method (`tokenizer.method: <name>`).

    train_head(run: HeadRun) fills run.ckpt (tokenizer/head.pt) and run.summary. train_tail(run: TailRun)
    -> summary trains Stage 2 into tokenizer/tail.pt; None: one stage (train_tail writes a marker).
    assign_ids(run: AssignRun) -> Assigned gives every item its SID; None: the frozen tokenizer of
    head.pt / tail.pt encodes every item. check(cfg) checks keys across (ConfigError), after the shared checks.
    reads: the `tokenizer.*` keys only methods declaring them read: left out of the other methods'
    comparison run keys. earlier_behaviour: key path (under `tokenizer`) -> the value that reproduces runs
    cached before the key existed; read_only_when: key path -> (switch path, test of the switch for
    "on"); both left out of comparison run keys like flows/compare.py's own tables. section: the model of
    the method's own params block `tokenizer.<name>` (components/runtime/config_schema.py `section(...)`),
    checked with the rest of params (required when the method is chosen) and one of its `keys`. doc: the
    docs table's cells (train_head, train_tail, SID length)."""

    name: str
    train_head: Hook
    train_tail: Hook | None = None
    assign_ids: Hook | None = None
    check: Hook | None = None
    adaptive: bool = False
    collision_token: bool = False
    reads: tuple[str, ...] = ()
    earlier_behaviour: Mapping[tuple[str, ...], object] = field(default_factory=dict)
    read_only_when: Mapping[tuple[str, ...], tuple[tuple[str, ...], Callable[[Any], bool]]] = field(
        default_factory=dict)
    section: Any = None
    doc: tuple[str, str, str] = ("", "marker file only", "fixed")

    @property
    def two_stage(self) -> bool:
        """Stage 1 on head items (their SIDs issued then), Stage 2 on the rest."""
        return self.train_tail is not None

    @property
    def keys(self) -> tuple[str, ...]:
        """The `tokenizer.*` keys only this method (and others declaring them) reads: `reads` and its section."""
        return self.reads + ((self.name,) if self.section is not None else ())

    def hook(self, name: str) -> Callable[[Any], Any] | None:
        """The hook `name` (train_head, train_tail, assign_ids, check) as a callable; None when not set."""
        target = getattr(self, name)
        return None if target is None else extensions.resolve(target)


def register(method: TokenizerMethod) -> TokenizerMethod:
    """Make `method` a choice of tokenizer.method; a name registered twice is a programming error."""
    extensions.register(KIND, method.name, method)
    return method


def unregister(name: str) -> None:
    """Drop a registration (one made for a while, e.g. by a test)."""
    extensions.unregister(KIND, name)


def methods() -> dict[str, TokenizerMethod]:
    """Every registered method by name, the built-in ones first (imported on the first call)."""
    return {name: extensions.entry(KIND, name) for name in extensions.names(KIND)}


def get_method(name: str) -> TokenizerMethod:
    """The registration of `name` (KeyError for an unknown one: params checks reject it before)."""
    return methods()[name]


def names_where(flag: str) -> tuple[str, ...]:
    """The methods with `flag` (an attribute: adaptive, two_stage, collision_token) true, in order."""
    return tuple(name for name, m in methods().items() if getattr(m, flag))


def methods_table() -> str:
    """The markdown table of docs/TOKENIZERS.md, from the registrations."""
    rows = ["| method | train_head | train_tail | SID length |", "|---|---|---|---|"]
    rows += [f"| `{m.name}` | {' | '.join(m.doc)} |" for m in methods().values()]
    return "\n".join(rows)

"""The code a pipeline stage runs, read from the imports: the one source of dvc.yaml's code deps
(and experiments/'s, flows/compare_dvc.py), so a module a stage imports is never missing from them.

A stage runs one function: a step of the step table (`step:train_retriever`) or a function a
comparison stage calls (`flows.compare:train_variant`). Its code deps are that function's file, the
project modules the function refers to (its own imports, the imported names it uses, the functions
of its module it calls, recursively), and every project module those import, transitively: module
level and inside functions (a lazy import is read when its function runs; `if TYPE_CHECKING:` never).
Packages are components/, flows/ and sa2crq/; the rest is third-party. A package's __init__.py counts
only when it holds code. The step table is the one module whose imports are not followed when an
import reaches it: it names every step, and a stage runs only its own.

Read with `ast`, never imported: no torch, nothing runs, and it works on any copy of the tree.
`sa2crq deps` rewrites the code deps of dvc.yaml and experiments/ from here (`--check`: only says
which stage is off); tests/probes/test_probe_stage_deps.py fails when a stage misses a module.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import gc
import io
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from components.runtime.errors import Sa2crqError

if TYPE_CHECKING:
    from ruamel.yaml import YAML

PACKAGES = ("components", "flows", "sa2crq")
STEP_TABLE = "STEPS"   # the module-level name of the step table (step name -> function)
# stages whose command is no step: the function the command runs
COMMAND_ROOTS = {"sa2crq resolve-params": ("components.runtime.config:load_params",
                                            "components.runtime.resolved_params:run_resolve_params")}
_STEP_CMD = re.compile(r"^sa2crq stage (\w+)$")
_STEP_TABLE_LINE = re.compile(rf"^{STEP_TABLE}\b", re.M)   # the files worth parsing to find the table
# a registration's lazy reference to the code it runs ('components.baselines.classic:run_bm25',
# components/runtime/extensions.py resolve): an import that happens when the extension runs
_REFERENCE = re.compile(rf"^((?:{'|'.join(PACKAGES)})(?:\.\w+)+):\w+$")


class StageDepsError(Sa2crqError):
    """A root that names no module, function or step (a renamed function, a step table that moved)."""


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING")


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """ast.walk without `if TYPE_CHECKING:` bodies and annotations (never evaluated here: every module
    has `from __future__ import annotations`)."""
    todo = [node]
    while todo:
        item = todo.pop()
        yield item
        for field, value in ast.iter_fields(item):
            if field in ("annotation", "returns") or (field == "body" and _type_checking(item)):
                continue
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    todo.append(child)


def _statements(nodes: list) -> Iterator[ast.AST]:
    """Every statement, in blocks and function bodies too (imports are statements: no expression is
    walked), without `if TYPE_CHECKING:` bodies."""
    for node in nodes:
        yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            if not (field == "body" and _type_checking(node)):
                yield from _statements(getattr(node, field, None) or [])


class ImportGraph:
    """The project's modules under `root` and what they import."""

    def __init__(self, root: Path | str = ".") -> None:
        self.root = Path(root)
        self._files: dict[str, Path | None] = {}
        self._imports: dict[str, set[str]] = {}
        self._table: str | None = None

    def file(self, module: str) -> Path | None:
        """The file of a project module (None: third-party or no such module)."""
        if module not in self._files:
            base = self.root.joinpath(*module.split("."))
            found = [p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()]
            self._files[module] = found[0] if found and module.split(".")[0] in PACKAGES else None
        return self._files[module]

    def tree(self, module: str) -> ast.Module:
        path = self.file(module)
        if path is None:
            raise StageDepsError(f"no project module {module!r} under {self.root}/")
        return _parse(path)

    def _is_package(self, module: str) -> bool:
        path = self.file(module)
        return path is not None and path.name == "__init__.py"

    def _targets(self, node: ast.Import | ast.ImportFrom, module: str) -> list[tuple[str, str]]:
        """(name bound, project module loaded) for each project module an import statement loads."""
        if isinstance(node, ast.Import):
            out = []
            for alias in node.names:
                parts = alias.name.split(".")
                found = next((".".join(parts[:n]) for n in range(len(parts), 0, -1)
                              if self.file(".".join(parts[:n]))), None)
                if found:
                    out.append((alias.asname or parts[0], found))
            return out
        base = node.module or ""
        if node.level:
            package = module if self._is_package(module) else module.rpartition(".")[0]
            parts = package.split(".")
            parts = parts[:len(parts) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        if self.file(base) is None:
            return []
        return [(alias.asname or alias.name, f"{base}.{alias.name}" if self.file(f"{base}.{alias.name}") else base)
                for alias in node.names]

    def imports(self, module: str) -> set[str]:
        """Every project module `module` imports, at module level or inside a function, or refers to
        with a 'package.module:function' string (a registration's runner, imported when it runs)."""
        if module not in self._imports:
            found = {m for node in _statements(self.tree(module).body) if isinstance(node, (ast.Import, ast.ImportFrom))
                     for _, m in self._targets(node, module)}
            found |= {match[1] for node in _walk(self.tree(module)) if isinstance(node, ast.Constant)
                      and isinstance(node.value, str) and (match := _REFERENCE.match(node.value))
                      and self.file(match[1])}
            self._imports[module] = found - {module}
        return self._imports[module]

    def step_table(self) -> str:
        """The module that assigns STEPS at module level (found, so that it may move)."""
        if self._table is None:
            found = [m for m in self._modules() if _STEP_TABLE_LINE.search(self.file(m).read_text()) and any(
                isinstance(node, (ast.Assign, ast.AnnAssign)) and STEP_TABLE in _bound(node)
                for node in _toplevel(self.tree(m)))]
            if len(found) != 1:
                raise StageDepsError(f"expected one module assigning {STEP_TABLE} under {', '.join(PACKAGES)}, "
                                     f"found {found or 'none'}")
            self._table = found[0]
        return self._table

    def _modules(self) -> Iterator[str]:
        for package in PACKAGES:
            for path in sorted((self.root / package).rglob("*.py")):
                rel = path.relative_to(self.root).with_suffix("")
                yield ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)

    def closure(self, modules: Iterable[str]) -> set[str]:
        """`modules`, their packages and every project module they import, transitively (the step
        table's own imports aside)."""
        seen: set[str] = set()
        todo = list(modules)
        while todo:
            module = todo.pop()
            if module in seen:
                continue
            seen.add(module)
            parts = module.split(".")
            todo += [".".join(parts[:n]) for n in range(1, len(parts))]
            if module != self.step_table():
                todo += self.imports(module)
        return seen

    def function_modules(self, module: str, name: str) -> set[str]:
        """The project modules `module`'s top-level `name` refers to, through the imports it makes, the
        imported names it uses and the module's own functions, classes and constants it uses (not the rest
        of what `module` imports: flows/compare.py's train_variant reads no evaluation code)."""
        tree = self.tree(module)
        defs: dict[str, ast.AST] = {}
        imported: dict[str, set[str]] = {}
        for node in _toplevel(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for bound, target in self._targets(node, module):
                    imported.setdefault(bound, set()).add(target)
            for bound in _bound(node):
                defs[bound] = node
        if name not in defs:
            raise StageDepsError(f"{self.file(module)}: no function {name!r} (a stage runs it)")
        found: set[str] = set()
        seen: set[str] = set()
        todo = [name]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            for node in _walk(defs[current]):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found |= {target for _, target in self._targets(node, module)}
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                    if node.id in imported:
                        found |= imported[node.id]
                    elif node.id in defs:
                        todo.append(node.id)
        return found

    def step_root(self, step: str) -> tuple[str, str]:
        """(step table module, the name of the function behind `step`)."""
        table = self.step_table()
        tree = self.tree(table)
        if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == step for n in _toplevel(tree)):
            return table, step
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if isinstance(k, ast.Constant) and k.value == step and isinstance(v, ast.Name):
                        return table, v.id
        raise StageDepsError(f"{self.file(table)}: no step {step!r}")

    def code_deps(self, roots: Iterable[str]) -> list[str]:
        """The files a stage that runs `roots` depends on, sorted, relative to root: a root is
        `step:NAME` or `package.module:function`."""
        with _collector_paused():
            return self._code_deps(roots)

    def _code_deps(self, roots: Iterable[str]) -> list[str]:
        own: set[str] = set()       # the modules of the functions run: their file, not all they import
        modules: set[str] = set()
        for root in roots:
            if root.startswith("step:"):
                module, name = self.step_root(root.removeprefix("step:"))
            elif ":" in root:
                module, name = root.split(":", 1)
            else:
                raise StageDepsError(f"{root!r}: a stage runs `step:NAME` or `package.module:function`")
            own.add(module)
            parts = module.split(".")
            modules |= {".".join(parts[:n]) for n in range(1, len(parts))}   # importing it runs its packages
            modules |= self.function_modules(module, name)
        files = {self.file(m) for m in own | self.closure(modules)}
        return sorted(p.relative_to(self.root).as_posix() for p in files if p is not None and _has_code(p))


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No garbage collection while parsing: in a process that loaded torch and pandas the collector scans
    their large heap every few thousand AST nodes, which made `sa2crq compare`'s plan 8x slower. Syntax
    trees hold no reference cycles, so nothing is left for it to collect."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _toplevel(tree: ast.Module) -> Iterator[ast.stmt]:
    """The module-level statements, inside module-level if / try / with blocks too."""
    todo = list(reversed(tree.body))
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)) and not _type_checking(node):
            blocks = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", []),
                      *(h.body for h in getattr(node, "handlers", []))]
            todo += [n for block in reversed(blocks) for n in reversed(block)]


def _bound(node: ast.AST) -> list[str]:
    """The names a top-level statement binds (defs, classes, plain and annotated assignments)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _has_code(path: Path) -> bool:
    """A module counts unless it is an __init__.py holding only its docstring."""
    return path.name != "__init__.py" or any(
        not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in _parse(path).body)


@functools.lru_cache(maxsize=1024)
def _parse_stamped(path: Path, stamp: tuple[int, int]) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _parse(path: Path) -> ast.Module:
    """A module's tree, parsed again only when the file changed (size, mtime): `sa2crq compare` plans
    every stage, and each comparison stage checks its plan, from the same files."""
    stat = path.stat()
    return _parse_stamped(path.resolve(), (stat.st_mtime_ns, stat.st_size))


def is_code(dep: object) -> bool:
    """Whether a stage's dep is project code (a module or a package folder), not data."""
    return isinstance(dep, str) and Path(dep).parts[:1] in [(p,) for p in PACKAGES]


def uncovered(files: Iterable[str], deps: Iterable[object]) -> list[str]:
    """The files no dep names, itself or as a folder above it."""
    listed = [Path(d) for d in deps if is_code(d)]
    return [f for f in files if not any(d == Path(f) or d in Path(f).parents for d in listed)]


def code_diff(want: list[str], deps: Iterable[object]) -> dict[str, list[str]] | None:
    """None when a stage's code deps are exactly `want`; else the files missing and the deps not needed."""
    have = [str(d) for d in deps if is_code(d)]
    return None if have == want else {"missing": uncovered(want, have), "extra": sorted(set(have) - set(want))}


def pipeline_roots(stages: Mapping[str, Mapping]) -> dict[str, tuple[str, ...]]:
    """What each dvc.yaml stage runs: `sa2crq stage NAME` runs step NAME, the others COMMAND_ROOTS."""
    roots = {}
    for name, stage in stages.items():
        cmd = " ".join(str(stage.get("cmd", "")).split())
        match = _STEP_CMD.match(cmd)
        if match:
            roots[name] = (f"step:{match[1]}",)
        elif cmd in COMMAND_ROOTS:
            roots[name] = COMMAND_ROOTS[cmd]
        else:
            raise StageDepsError(f"stage {name!r} runs {cmd!r}: no `sa2crq stage STEP`; name the function it runs "
                                 "in components/runtime/stage_deps.py COMMAND_ROOTS")
    return roots


def stage_deps(stage: Mapping) -> list:
    """A stage's deps list (a foreach stage's are under `do`)."""
    return list((stage.get("do") or stage).get("deps") or [])


def _yaml() -> YAML:
    from ruamel.yaml import YAML  # round trip: dvc.yaml keeps its comments and layout

    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    yaml.preserve_quotes = True
    return yaml


def sync_dvc_file(path: Path | str, roots: Mapping[str, Iterable[str]] | None = None, check: bool = False,
                  root: Path | str = ".") -> dict[str, dict[str, list[str]]]:
    """Rewrite the code deps of every stage of a dvc.yaml (`roots`: what each stage runs; None: the
    pipeline's, from the commands) as the sorted code_deps of what it runs, after its other deps;
    comments and everything else stay. Returns, per stage whose code deps were off, the files missing
    and the code deps no longer needed; `check`: only returns them."""
    path, yaml = Path(path), _yaml()
    doc = yaml.load(path.read_text())
    stages = doc["stages"]
    roots = pipeline_roots(stages) if roots is None else roots
    graph, off = ImportGraph(root), {}
    for name, stage in stages.items():
        want = graph.code_deps(roots[name])
        diff = code_diff(want, stage_deps(stage))
        if diff is None:
            continue
        off[f"{path.as_posix()}:{name}"] = diff
        block = stage.get("do") or stage
        deps = block["deps"]
        kept = [d for d in deps if not is_code(d)]
        del deps[:]
        deps.extend(kept + want)
    if off and not check:
        out = io.StringIO()
        yaml.dump(doc, out)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as handle:
            handle.write(out.getvalue())
        os.chmod(tmp, path.stat().st_mode)
        os.replace(tmp, path)
    return off

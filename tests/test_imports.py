"""The import graph of ddpmseg (``ddpmseg/`` and ``cli/``, installed as ``ddpmseg.cli``), read from the source.

Every ``.py`` file is parsed (not imported) and every import statement it
holds is collected: at module level (including class bodies, ``try`` and
``if`` blocks) and inside functions. How a statement becomes edges of the
module graph:

- ``import a.b.c`` is an edge to ``a.b.c``; ``from a.b import c`` is an edge
  to ``a.b.c`` when that is a module (a submodule, so ``from ddpmseg import
  data`` imports ``ddpmseg.data``), else to ``a.b`` (a name that ``a.b`` or its
  ``__init__`` defines); relative imports are resolved against the module's
  package first.
- A lazy re-export is an edge as well: ``importlib.import_module("x.y")``
  with a literal, and, in a module that calls ``import_module`` with a
  computed name or ``ddpmseg._lazy.lazy_exports``, every string constant
  that names one of our modules (an ``_EXPORTS`` table such as
  ``ddpmseg/__init__.py``'s).
- Imports under ``if TYPE_CHECKING:`` are left out (they never run).
- The parent packages that Python initialises before a submodule (importing
  ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first) are not edges of
  the graph for the cycle check (every module would otherwise sit in a cycle
  with its package); they are followed where the question is what runs at
  import time (:func:`runs_at_import`, the torch-free check).

Cycles (Tarjan's strongly connected components of more than one module, on
module-level and function-level edges together: a cycle through a
function-level import is still two modules that each need the other) with
one exception, the usual pattern of a submodule using its own package: an
edge from ``p.sub`` (at any depth below ``p``) to the package ``p`` itself
(its ``__init__``) is not counted when ``p/__init__`` does not reach
``p.sub`` through module-level imports. Then ``p`` is always fully
initialised before ``p.sub`` runs (``p/__init__`` cannot be part-way through
importing ``p.sub``), so the two cannot see each other half-built, even
when ``p/__init__`` re-exports ``p.sub``'s names lazily. When ``p/__init__``
does import ``p.sub`` at module level (directly or through other modules),
``p.sub`` using ``p`` is a real cycle and counts.

Private modules: a module whose own name starts with ``_`` (``pkg._x``) may
be imported only from inside ``pkg`` (``pkg`` itself or modules below it);
``ddpmseg._io``, ``_optional``, ``_text`` and ``_version`` sit at the top of
the package, so every module of ddpmseg may use them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"ddpmseg": ROOT / "ddpmseg", "ddpmseg.cli": ROOT / "cli"}  # setup.cfg: package_dir ddpmseg.cli = cli

# Import cycles known and being removed (each as the sorted modules of its component): the one
# place to list one while it is fixed. Empty since ddpmseg/workers.py took Extractor/Segmenter out
# of pipeline.py (the pipeline <-> engines.ray_data cycle).
KNOWN_CYCLES: list[tuple[str, ...]] = []

# Modules that must not start torch when imported (numpy-only work, and the CLI's --help).
TORCH_FREE = [
    "ddpmseg",
    "ddpmseg.options",
    "ddpmseg.runtime",
    "ddpmseg.metrics",
    "ddpmseg.anomaly.config",
    "ddpmseg.anomaly.metrics",
    "ddpmseg.active.strategies",
    "ddpmseg.data",
    "ddpmseg.data.labelsets",
    "ddpmseg.data.masks",
    "ddpmseg.data.palette",
    "ddpmseg.train.config",
    "ddpmseg.label",
    "ddpmseg.label.store",
    "ddpmseg.label.strokes",
    "ddpmseg.cli.main",  # at load time; each command imports what it runs
]


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # a module (ours or a third party's top-level name)
    module_level: bool  # runs when ``source`` is imported (not only when a function of it is called)
    line: int


def _module_name(package: str, root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


@lru_cache(maxsize=None)
def module_files() -> dict[str, Path]:
    """Our module names -> their files."""
    found = {}
    for package, root in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[_module_name(package, root, path)] = path
    return found


def _is_package(name: str) -> bool:
    return module_files()[name].name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(source: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = source if _is_package(source) else source.rpartition(".")[0]
    parts = package.split(".")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(source: str, node: ast.AST) -> list[str]:
    modules = module_files()
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = _resolve(source, node)
    found = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        found.append(sub if sub in modules else base)
    return found


class _Collector(ast.NodeVisitor):
    def __init__(self, source: str) -> None:
        self.source = source
        self.depth = 0  # function nesting
        self.found: list[Import] = []
        self.strings: list[tuple[str, int]] = []
        self.dynamic = False  # import_module called with a computed name

    def _add(self, target: str, line: int) -> None:
        self.found.append(Import(self.source, target, self.depth == 0, line))

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for t in _targets(self.source, node):
            self._add(t, node.lineno)

    visit_ImportFrom = visit_Import

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                self._add(arg.value, node.lineno)
            else:
                self.dynamic = True
        elif name == "lazy_exports":  # ddpmseg._lazy's table-driven __getattr__
            self.dynamic = True
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str):
            self.strings.append((node.value, node.lineno))


@lru_cache(maxsize=None)
def imports() -> tuple[Import, ...]:
    """Every import of every module of ours (see the module docstring for what counts)."""
    modules = module_files()
    found: list[Import] = []
    for name, path in modules.items():
        c = _Collector(name)
        c.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        found += c.found
        if c.dynamic:  # a lazy export table: its module names are (function-level) edges
            found += [Import(name, s, False, line) for s, line in c.strings if s in modules and s != name]
    return tuple(found)


def _ours(target: str) -> bool:
    return target in module_files()


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def build_graph(found: Iterable[Import], modules: set[str], packages: set[str]) -> dict[str, set[str]]:
    """``modules`` -> the ones of them each imports (module or function level), with the one
    exception of the module docstring: an edge from ``p.sub`` to its own package ``p`` is left out
    when ``p/__init__`` does not reach ``p.sub`` through module-level imports."""
    found = [i for i in found if i.target in modules and i.target != i.source]
    module_level: dict[str, set[str]] = {m: set() for m in modules}
    for i in found:
        if i.module_level:
            module_level[i.source].add(i.target)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for i in found:
        if i.target in packages and i.source.startswith(i.target + ".") \
                and i.source not in _reachable(module_level, i.target):
            continue
        graph[i.source].add(i.target)
    return graph


def import_graph() -> dict[str, set[str]]:
    """ddpmseg's module graph (:func:`build_graph` of every import of every module)."""
    modules = set(module_files())
    return build_graph(imports(), modules, {m for m in modules if _is_package(m)})


def strongly_connected(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Tarjan's strongly connected components with more than one node, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[tuple[str, ...]] = []
    counter = 0

    def visit(v: str) -> None:  # recursive: the graph has ~80 nodes
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(tuple(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def runs_at_import(name: str) -> set[str]:
    """What importing ``name`` runs: our modules (parent packages included) and third-party
    top-level names, following module-level imports only."""
    by_source: dict[str, list[Import]] = {}
    for i in imports():
        if i.module_level:
            by_source.setdefault(i.source, []).append(i)
    seen: set[str] = set()
    todo = [name]
    while todo:
        m = todo.pop()
        for step in [*_parents(m), m]:
            if step in seen:
                continue
            seen.add(step)
            if _ours(step):
                todo += [i.target for i in by_source.get(step, [])]
    return {m if _ours(m) else m.split(".")[0] for m in seen}


def _chain(start: str, goal: str) -> list[str]:
    """One module-level import chain from ``start`` to the third-party ``goal`` (for messages)."""
    by_source: dict[str, set[str]] = {}
    for i in imports():
        if i.module_level:
            by_source.setdefault(i.source, set()).add(i.target)
    prev: dict[str, str | None] = {start: None}
    todo = [start]
    while todo:
        m = todo.pop(0)
        nexts = sorted(by_source.get(m, set()) | set(_parents(m)))
        for n in nexts:
            if n in prev:
                continue
            prev[n] = m
            if n.split(".")[0] == goal and not _ours(n):
                path = [n]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return path[::-1]
            if _ours(n):
                todo.append(n)
    return []


def _private_module(name: str) -> bool:
    return name.rpartition(".")[2].startswith("_") and not name.rpartition(".")[2].startswith("__")


# ---------------------------------------------------------------------------------------------


def test_the_scan_sees_the_package() -> None:
    modules = module_files()
    assert {"ddpmseg", "ddpmseg.cli.main", "ddpmseg.pipeline", "ddpmseg.backbones._builder"} <= set(modules)
    edges = {(i.source, i.target) for i in imports()}
    # a submodule named in `from pkg import name`, a lazy export table, and a function-level import
    assert ("ddpmseg.train.loop", "ddpmseg.viz") in edges
    assert ("ddpmseg", "ddpmseg.pipeline") in edges
    assert any(i.source == "ddpmseg.cli.main" and i.target == "ddpmseg.pipeline" and not i.module_level
               for i in imports())


def test_cycle_detection_on_a_made_up_graph() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d", "a"}, "e": set()}
    assert strongly_connected(g) == [("a", "b", "c")]


def _made_up(edges: list[tuple[str, str, bool]]) -> dict[str, set[str]]:
    """build_graph of made-up (source, target, module_level) imports; "p" and "p.q" are packages."""
    found = [Import(s, t, level, 0) for s, t, level in edges]
    modules = {m for s, t, _ in edges for m in (s, t)}
    return build_graph(found, modules, {"p", "p.q"})


def test_the_package_rule_on_made_up_graphs() -> None:
    # p/__init__ re-exports p.sub lazily (function level) and p.sub uses p: the usual pattern, no cycle
    assert strongly_connected(_made_up([("p", "p.sub", False), ("p.sub", "p", True)])) == []
    # p/__init__ imports p.sub at module level, and p.sub uses p: a real cycle
    assert strongly_connected(_made_up([("p", "p.sub", True), ("p.sub", "p", True)])) == [("p", "p.sub")]
    # ... also when p reaches p.q.sub at module level through another module
    assert strongly_connected(_made_up([("p", "p.a", True), ("p.a", "p.q.sub", True), ("p.q.sub", "p", False)])) \
        == [("p", "p.a", "p.q.sub")]
    # a module that is not below p gets no such pass, and function-level imports count
    assert strongly_connected(_made_up([("p", "x", False), ("x", "p", True)])) == [("p", "x")]


def test_no_import_cycles() -> None:
    cycles = strongly_connected(import_graph())
    unexpected = [c for c in cycles if c not in KNOWN_CYCLES]
    assert not unexpected, "import cycles: " + "; ".join(" <-> ".join(c) for c in unexpected)
    gone = [c for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, f"no longer cycles, take them off KNOWN_CYCLES: {gone}"


@pytest.mark.parametrize("name", TORCH_FREE)
def test_torch_free_modules_do_not_import_torch_statically(name: str) -> None:
    assert name in module_files()
    assert "torch" not in runs_at_import(name), f"{name} imports torch at load time: {' -> '.join(_chain(name, 'torch'))}"


@pytest.mark.parametrize("name", TORCH_FREE)
def test_torch_free_modules_do_not_import_torch(name: str) -> None:
    """The same, for real: in a fresh interpreter (one module's imports would hide another's)."""
    r = subprocess.run([sys.executable, "-c", f"import {name}, sys; print('torch' in sys.modules)"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False", f"importing {name} started torch"


def test_evaluate_anomaly_command_never_imports_torch(tmp_path: Path) -> None:
    import numpy as np

    maps, masks = tmp_path / "maps", tmp_path / "masks"
    maps.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        m = np.zeros((16, 16), bool)
        if i:
            m[4:8, 4:8] = True
        np.save(maps / f"im{i}_anomaly.npy", (rng.random((16, 16)) * 0.1 + 0.5 * m).astype(np.float32))
        np.save(masks / f"im{i}.npy", m)
    code = ("import sys\n"
            "from ddpmseg.cli.main import main\n"
            "try:\n"
            f"    main(['evaluate-anomaly', '--maps', {str(maps)!r}, '--masks', {str(masks)!r}, '--json'])\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print('torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False", "evaluate-anomaly started torch"
    assert '"pixel_auroc"' in r.stdout


def test_data_does_not_import_viz() -> None:
    bad = [i for i in imports() if (i.source == "ddpmseg.data" or i.source.startswith("ddpmseg.data."))
           and (i.target == "ddpmseg.viz" or i.target.startswith("ddpmseg.viz."))]
    assert not bad, "; ".join(f"{i.source} (line {i.line}) imports {i.target}" for i in bad)


def test_no_module_imports_another_packages_private_module() -> None:
    bad = []
    for i in imports():
        if not _ours(i.target) or not _private_module(i.target):
            continue
        owner = i.target.rpartition(".")[0]
        if i.source != owner and not i.source.startswith(owner + "."):
            bad.append(f"{i.source} (line {i.line}) imports {i.target}")
    assert not bad, "; ".join(bad)


def test_setup_cfg_installs_every_package() -> None:
    """A wheel (not an editable install) holds only the packages setup.cfg lists: every folder of
    ddpmseg/ with an __init__.py must be there (ddpmseg.distill once was not)."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ddpmseg").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    assert found and found <= listed, sorted(found - listed)

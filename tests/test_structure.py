"""The package's shape: no import cycle, and the layers import one way.

Read from the source with :mod:`ast` (nothing is imported but ``edgec`` itself, to find where
its subpackages live): every module of the ``edgec`` package -- ``edgec/``, and ``passes/``,
``targets/``, ``runtime/``, ``models/`` installed as its subpackages -- and what it imports
from the package.

* Top-level imports (what runs when the module is imported; not those inside functions or
  under ``if TYPE_CHECKING:``) form a graph without a cycle.
* The ground, :mod:`edgec.core`, imports nothing of the package outside itself.
* The roof, :mod:`edgec.driver`, is imported by nothing below it (passes, targets, runtime,
  models, the ground), not even inside a function.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

PACKAGE = "edgec"
GROUND = "edgec.core"
ROOF = "edgec.driver"


def _roots() -> dict[str, Path]:
    """Package name -> its folder, for ``edgec`` and each subpackage that lives elsewhere."""
    spec = importlib.util.find_spec(PACKAGE)
    top = Path(next(iter(spec.submodule_search_locations)))
    roots = {PACKAGE: top}
    for name in ("passes", "targets", "runtime", "models"):
        sub = importlib.util.find_spec(f"{PACKAGE}.{name}")
        if sub is not None and sub.submodule_search_locations:
            roots[f"{PACKAGE}.{name}"] = Path(next(iter(sub.submodule_search_locations)))
    return roots


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package), for every module of the package."""
    mods: dict[str, tuple[Path, bool]] = {}
    roots = _roots()
    for pkg, folder in roots.items():
        for f in sorted(folder.rglob("*.py")):
            rel = f.relative_to(folder).with_suffix("").parts
            if "__pycache__" in rel:
                continue
            is_pkg = rel[-1] == "__init__"
            parts = rel[:-1] if is_pkg else rel
            name = ".".join((pkg, *parts))
            mods.setdefault(name, (f, is_pkg))
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, is_pkg: bool, known: set[str]) -> tuple[set[str], set[str]]:
    """(modules of the package imported at top level, ... imported anywhere) by ``name``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = name if is_pkg else name.rpartition(".")[0]

    def targets(node: ast.Import | ast.ImportFrom) -> set[str]:
        out: set[str] = set()
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    out.add(alias.name)
            return out
        if node.level:
            base = here.split(".")
            base = base[:len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        for alias in node.names:
            sub = f"{mod}.{alias.name}"
            if sub in known:          # from pkg import submodule
                out.add(sub)
            elif mod in known:        # from module import name
                out.add(mod)
        return out

    top: set[str] = set()
    anywhere: set[str] = set()

    def walk(nodes, at_top: bool) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found = targets(node)
                anywhere.update(found)
                if at_top:
                    top.update(found)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                walk(node.body, False)
                walk(node.orelse, at_top)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                walk(ast.iter_child_nodes(node), False)
            elif isinstance(node, ast.ClassDef):  # a class body runs at import
                walk(ast.iter_child_nodes(node), at_top)
            else:
                walk(ast.iter_child_nodes(node), at_top)

    walk(tree.body, True)
    top.discard(name)
    anywhere.discard(name)
    return top, anywhere


@pytest.fixture(scope="module")
def graph() -> dict[str, tuple[set[str], set[str]]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, is_pkg, known) for name, (path, is_pkg) in mods.items()}


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, as a path that comes back to its start; None if acyclic."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(edges, WHITE)
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = GREY
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if color.get(m, BLACK) == GREY:
                return stack[stack.index(m):] + [m]
            if color.get(m) == WHITE:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        color[n] = BLACK
        return None

    for n in sorted(edges):
        if color[n] == WHITE:
            found = visit(n)
            if found:
                return found
    return None


def _in(name: str, pkg: str) -> bool:
    return name == pkg or name.startswith(pkg + ".")


def test_the_walk_sees_the_whole_package(graph):
    for expected in (PACKAGE, f"{GROUND}.errors", f"{GROUND}.importer", f"{ROOF}.compiler",
                     f"{ROOF}.cli", f"{ROOF}.cli.compile", "edgec.passes", "edgec.targets",
                     "edgec.runtime", "edgec.runtime.artifact"):
        assert expected in graph, expected
    # and the edges resolve (relative imports included)
    assert f"{GROUND}.errors" in graph[f"{GROUND}.importer"][0]
    assert f"{ROOF}.pipeline" in graph[f"{ROOF}.compiler"][0]


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle(graph):
    cycle = _cycle({name: top for name, (top, _) in graph.items()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_ground_imports_nothing_above_it(graph):
    for name, (_, anywhere) in sorted(graph.items()):
        if _in(name, GROUND):
            above = sorted(m for m in anywhere if not _in(m, GROUND) and m != PACKAGE)
            assert not above, f"{name} (the ground) imports {above}"
    # the package's own __init__ stays on the ground too: importing edgec.core runs it
    assert all(_in(m, GROUND) for m in graph[PACKAGE][1]), graph[PACKAGE][1]


def test_nothing_below_imports_the_roof(graph):
    for name, (_, anywhere) in sorted(graph.items()):
        if not _in(name, ROOF):
            roof = sorted(m for m in anywhere if _in(m, ROOF))
            assert not roof, f"{name} imports the driver: {roof}"


def test_every_subpackage_is_installed():
    """A folder with an ``__init__.py`` that pyproject.toml does not list works in an editable
    install and is missing from a wheel."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    listed = set(tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, (path, is_pkg) in _modules().items() if is_pkg}
    assert packages <= listed, f"not in pyproject.toml's packages: {sorted(packages - listed)}"

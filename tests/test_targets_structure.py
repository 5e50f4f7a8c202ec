"""The shape of ``targets/`` (issue 16): a one-way import graph (no cycle, lazy imports
included), listing targets imports no TVM, no module borrows another's private names, files
and functions stay short, and every kernel's rule is in the default-schedule rule list."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "targets"
PKG = "edgec.targets"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PKG, *parts])] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, list[str]]]:
    """``(module imported, names taken from it)`` for every import in the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            mod = (f"{base}.{node.module}" if node.module else base) if node.level else \
                node.module
            names = [a.name for a in node.names]
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
            out += [(s, []) for s in subs] or [(mod, names)]
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m, _ in _imports(name, path, modules) if m in modules and m != name}
            for name, path in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"import cycle: {' -> '.join(stack + [m, n])}"
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_private_names_borrowed():
    modules = _modules()
    for name, path in modules.items():
        for mod, names in _imports(name, path, modules):
            if mod.startswith(PKG):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{name} imports {private} from {mod}"


def test_listing_targets_imports_no_tvm():
    code = ("import sys; from edgec.targets import list_targets; list_targets(); "
            "print('tvm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_files_and_functions_are_short():
    for path in ROOT.rglob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 600, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 80, f"{path}:{node.lineno} {node.name}"


def test_every_kernel_rule_is_in_the_rule_list():
    import importlib

    from edgec.targets.cpu.rules import RULES

    rules = []
    for path in sorted((ROOT / "cpu" / "kernels").glob("*.py")):
        mod = importlib.import_module(f"{PKG}.cpu.kernels.{path.stem}")
        if hasattr(mod, "RULE"):
            rules.append(mod.RULE)
    assert rules and all(r in RULES for r in rules) and len(RULES) == len(rules)
    assert RULES[-1].name == "generic"  # the fallback comes last

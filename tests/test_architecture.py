"""The package's shape (docs/architecture.md): the library never imports the application or the
command line, no import cycles, no oversized modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ebflow"
MAX_LINES = 420


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ebflow module ``path`` imports, anywhere in the file (also inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ebflow")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("ebflow"):
                out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names}
    return out


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(target: str) -> str | None:
    """The module a dotted import target refers to (a module, or the module holding a name)."""
    while target and target not in MODULES:
        target = target.rsplit(".", 1)[0] if "." in target else ""
    return target or None


GRAPH = {name: {m for t in _imports(path) if (m := _resolve(t)) and m != name}
         for name, path in MODULES.items()}


@pytest.mark.parametrize("name", sorted(n for n in MODULES
                                         if not n.startswith(("ebflow.experiment", "ebflow.cli"))
                                         and n != "ebflow.__main__"))
def test_library_never_imports_the_application(name):
    bad = sorted(m for m in GRAPH[name] if m.startswith(("ebflow.experiment", "ebflow.cli")))
    assert not bad, f"{name} imports {bad}"


def test_no_import_cycles():
    # a package's __init__ re-exporting its modules is not a cycle of concerns: skip those edges
    graph = {n: {m for m in deps if not (n.endswith(".__init__") or m == n.rsplit(".", 1)[0])}
             for n, deps in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in graph.get(n, ()):
            if MODULES[m].name == "__init__.py":
                continue  # importing a package's public names
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"

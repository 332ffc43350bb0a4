"""The package's shape (docs/architecture.md): the library never imports the application or the
command line and opens no file, the application is grouped into sub-packages, no import cycles,
no oversized modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ebflow"
MAX_LINES = 400


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


GRAPH = {
    name: {m for t in _imports(path) if (m := _resolve(t)) and m != name} for name, path in MODULES.items()
}


LIBRARY = sorted(
    n for n in MODULES if not n.startswith(("ebflow.experiment", "ebflow.cli")) and n != "ebflow.__main__"
)


#: The one import of the application by the library: ``ebflow.load_run``, imported inside the
#: package's module ``__getattr__`` on first use (never at import time: checked below).
LAZY_IMPORTS = {"ebflow": {"ebflow.experiment.rundir.load"}}


@pytest.mark.parametrize("name", LIBRARY)
def test_library_never_imports_the_application(name):
    bad = sorted(
        m
        for m in GRAPH[name] - LAZY_IMPORTS.get(name, set())
        if m.startswith(("ebflow.experiment", "ebflow.cli"))
    )
    assert not bad, f"{name} imports {bad}"


def test_importing_the_library_imports_no_application_module():
    code = (
        "import sys, ebflow, ebflow.layers, ebflow.objectives, ebflow.mcmc; "
        "print(sorted(m for m in sys.modules if m.startswith(('ebflow.experiment', 'ebflow.cli'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


#: Calls that read or write files (``open(...)``, ``path.write_text(...)``, ``Image.open(...)``,
#: ``torch.save(...)``, ``save_image(...)``, ``fig.savefig(...)``, ...) and modules that do.
FILE_CALLS = {
    "open",
    "read_text",
    "read_bytes",
    "write_text",
    "write_bytes",
    "save",
    "load",
    "savefig",
    "save_image",
    "imread",
    "imwrite",
    "fdopen",
    "mkdir",
    "unlink",
}
FILE_MODULES = ("PIL", "imageio", "matplotlib", "csv", "pickle", "shutil", "tempfile", "gzip")
#: The one file the library reads: the digits shipped inside the package (``ebflow.datasets``,
#: read through ``importlib.resources``), never a path its user gives.
PACKAGE_DATA_READS = {"ebflow.datasets": {"read_bytes", "load"}}


@pytest.mark.parametrize("name", LIBRARY)
def test_library_opens_no_file(name):
    """Reading and writing files (checkpoints, data, pictures, masks) is the application's."""
    bad = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if called in FILE_CALLS - PACKAGE_DATA_READS.get(name, set()):
                bad.append(f"{called}() on line {node.lineno}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            bad += [f"import {m} on line {node.lineno}" for m in mods if m.split(".")[0] in FILE_MODULES]
            if isinstance(node, ast.ImportFrom) and any(a.name == "save_image" for a in node.names):
                bad.append(f"import save_image on line {node.lineno}")
    assert not bad, f"{name}: {bad}"


def test_the_application_is_grouped_into_sub_packages():
    """``ebflow.experiment`` holds sub-packages named for what they hold, no loose modules; a
    sub-package's ``__init__`` re-exports nothing, so each name has one import path."""
    loose = sorted(p.name for p in (PACKAGE / "experiment").glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules outside the sub-packages of ebflow.experiment: {loose}"
    for init in (PACKAGE / "experiment").glob("*/__init__.py"):
        body = ast.parse(init.read_text()).body
        assert all(isinstance(n, ast.Expr) for n in body), f"{init.parent.name}/__init__.py has code"


def test_no_import_cycles():
    # a package's __init__ re-exporting its modules is not a cycle of concerns: skip those edges
    graph = {
        n: {m for m in deps if not (n.endswith(".__init__") or m == n.rsplit(".", 1)[0])}
        for n, deps in GRAPH.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in graph.get(n, ()):
            if MODULES[m].name == "__init__.py":
                continue  # importing a package's public names
            if state.get(m) == 1:
                cycle = stack[stack.index(m) :] + [m]
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

"""The documentation: the site builds offline with ``mkdocs build --strict`` (a broken link or
anchor fails it), every public class, function and method has a docstring, every relative link
of README.md and docs/ reaches a file, and the docstrings' ``>>>`` examples run."""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ebflow

ROOT = Path(__file__).resolve().parents[1]

#: The modules of the API reference (docs/api/): every name in their ``__all__`` is public.
PUBLIC_MODULES = [
    "ebflow",
    "ebflow.layers",
    "ebflow.objectives",
    "ebflow.objectives.toolkit",
    "ebflow.mcmc",
    "ebflow.prior",
    "ebflow.preprocessing",
    "ebflow.inpainting",
    "ebflow.architectures",
    "ebflow.ema",
    "ebflow.errors",
    "ebflow.runtime",
    "ebflow.compiled",
    "ebflow.datasets",
    "ebflow.images",
    "ebflow.image_flow",
]
#: Public names outside those modules (the application's run loader, ``ebflow.load_run``).
EXTRA_PUBLIC = {"ebflow.experiment.rundir.load": ["load_run", "LoadedRun"]}
#: torch.nn.Module hooks that layers override; not part of ebflow's API (hidden on the site too).
TORCH_HOOKS = {"extra_repr"}
#: Library modules whose ``>>>`` examples run here (the application and the command line may
#: import optional packages and are not part of the library's examples).
DOCTEST_SKIP = ("ebflow.experiment", "ebflow.cli", "ebflow.__main__")


# -- 1. the site -------------------------------------------------------------------------------
def test_site_builds_offline_in_strict_mode(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    env = {
        **os.environ,
        "NO_MKDOCS_2_WARNING": "1",
        "OMP_NUM_THREADS": "1",
        # no proxy reachable: a build that tried to download would fail here
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "api" / "ebflow" / "index.html").is_file()


# -- 2. docstrings -----------------------------------------------------------------------------
def _own(cls: type) -> bool:
    return getattr(cls, "__module__", "").split(".")[0] == "ebflow"


def _class_doc(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    # dataclasses and named tuples write "Name(field, ...)" when the class has no docstring
    return "" if doc.startswith(f"{cls.__name__}(") else doc.strip()


def _member_doc(cls: type, name: str) -> str:
    """The docstring of member ``name`` of ``cls``, inherited only from ebflow's own classes."""
    for klass in cls.__mro__:
        if not _own(klass) or name not in klass.__dict__:
            continue
        attr = klass.__dict__[name]
        fn = attr.fget if isinstance(attr, property) else getattr(attr, "__func__", attr)
        doc = (getattr(fn, "__doc__", None) or "").strip()
        if doc:
            return doc
    return ""


def _public_methods(cls: type) -> list[str]:
    names = set()
    for klass in cls.__mro__:
        if not _own(klass):
            continue
        for name, attr in vars(klass).items():
            if (name.startswith("_") and name != "__call__") or name in TORCH_HOOKS:
                continue
            if isinstance(attr, (staticmethod, classmethod, property)) or inspect.isfunction(attr):
                names.add(name)
    return sorted(names)


def _public_objects():
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            yield module_name, name, getattr(module, name)
    for module_name, names in EXTRA_PUBLIC.items():
        module = importlib.import_module(module_name)
        for name in names:
            yield module_name, name, getattr(module, name)


def test_every_public_class_function_and_method_has_a_docstring():
    missing, seen = [], set()
    for module_name, name, obj in _public_objects():
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if inspect.isclass(obj):
            if not _class_doc(obj):
                missing.append(f"{module_name}.{name}")
            missing += [f"{module_name}.{name}.{m}" for m in _public_methods(obj) if not _member_doc(obj, m)]
        elif not (inspect.getdoc(obj) or "").strip():
            missing.append(f"{module_name}.{name}")
    assert len(seen) > 80
    assert not missing, f"{len(missing)} public names without a docstring:\n" + "\n".join(missing)


#: Top-level library modules documented through another page (their public names are exported by
#: ``ebflow``), or internal helpers; everything else under ``src/ebflow`` must be in PUBLIC_MODULES.
NOT_A_PAGE = {
    "flow",
    "linear_prefix",
    "compiled",
    "utils",
    "validation",
    "experiment",
    "cli",
    "__main__",
    "__init__",
}


def test_every_top_level_module_is_listed_or_declared_internal():
    """A new library module cannot be added without an API page (or a decision that it has none)."""
    names = {
        p.stem
        for p in (ROOT / "src" / "ebflow").iterdir()
        if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    unlisted = sorted(
        n
        for n in names
        if not n.startswith("_") and n not in NOT_A_PAGE and f"ebflow.{n}" not in PUBLIC_MODULES
    )
    assert not unlisted, f"library modules with no API page: {unlisted} (add one, or list them in NOT_A_PAGE)"


def test_every_listed_public_module_has_an_api_page():
    pages = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))
    for module_name in PUBLIC_MODULES:
        assert re.search(rf"^::: {re.escape(module_name)}$", pages, re.M), f"no API page for {module_name}"


# -- 3. links ----------------------------------------------------------------------------------
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def _relative_links(text: str) -> list[str]:
    text = _FENCE.sub("", text)
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans
    links = _LINK.findall(text) + _REF_DEF.findall(text)
    return [t for t in links if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I) and not t.startswith("#")]


def test_relative_links_reach_files():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for f in files:
        for target in _relative_links(f.read_text(encoding="utf-8")):
            path = target.split("#", 1)[0].split("?", 1)[0]
            if path and not (f.parent / path).exists():
                broken.append(f"{f.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_no_escaped_pipe_inside_code_spans():
    """In a table, GitHub needs ``\\|`` for a pipe while the site's Markdown shows the backslash of
    a ``\\|`` inside a code span: such cells are written without a code span."""
    bad = [
        f"{f.relative_to(ROOT)}:{i}"
        for f in sorted((ROOT / "docs").rglob("*.md"))
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
        if any("\\|" in span for span in re.findall(r"`[^`]*`", line))
    ]
    assert not bad, "escaped pipes inside code spans: " + ", ".join(bad)


def test_link_checker_sees_links():
    text = "a [b](c.md) ![i](d.png#x) [e](https://x) [f](#g) `[h](i.md)`\n```\n[j](k.md)\n```\n[r]: s.md"
    assert sorted(_relative_links(text)) == ["c.md", "d.png#x", "s.md"]


# -- 4. the docstrings' examples ---------------------------------------------------------------
def _library_modules() -> list[str]:
    names = ["ebflow"]
    for info in pkgutil.walk_packages(ebflow.__path__, "ebflow."):
        if not info.name.startswith(DOCTEST_SKIP):
            names.append(info.name)
    return sorted(names)


def test_docstring_examples_run():
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    threads, examples, seen = torch.get_num_threads(), 0, set()
    torch.set_num_threads(1)
    try:
        for name in _library_modules():
            module = importlib.import_module(name)
            for test in finder.find(module, name):
                key = (test.filename, test.lineno)
                if not test.examples or key in seen:
                    continue
                seen.add(key)
                torch.manual_seed(0)
                runner.run(test)
                examples += len(test.examples)
    finally:
        torch.set_num_threads(threads)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed (see above)"
    assert examples >= 20, f"only {examples} docstring examples found"

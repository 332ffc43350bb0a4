"""The developer tools pass on the code: ruff (lint and format) and mypy, as configured in
pyproject.toml (``[tool.ruff*]``, ``[tool.mypy]``), run from the repository root as a developer
runs them. The tools come with the test extra; a missing tool fails these tests (it is not
skipped), so that CI cannot pass without having run them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "pip install -e '.[test]'"


def _run(tool: str, *args: str, fix: str) -> None:
    """Run ``python -m tool args`` in the repository root; fail with its output unless it exits 0."""
    if importlib.util.find_spec(tool) is None:
        pytest.fail(f"{tool} is not installed: install the test tools with {INSTALL}", pytrace=False)
    command = [sys.executable, "-m", tool, *args]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        pytest.fail(
            f"`{tool} {' '.join(args)}` exited {proc.returncode} ({fix}):\n{proc.stdout}{proc.stderr}",
            pytrace=False,
        )


# every Python file a user reads or runs: the package, its tests, the examples and the benchmarks
CHECKED = ("src", "tests", "examples", "benchmarks")


def test_ruff_lint_is_clean():
    folders = " ".join(CHECKED)
    _run("ruff", "check", *CHECKED, fix=f"`ruff check --fix {folders}` fixes some")


def test_ruff_format_is_clean():
    folders = " ".join(CHECKED)
    fix = f"`ruff format --diff {folders}` shows the changes, `ruff format {folders}` makes them"
    _run("ruff", "format", "--check", "--output-format", "concise", *CHECKED, fix=fix)


def test_mypy_is_clean():
    _run("mypy", fix="files and settings in pyproject.toml's [tool.mypy]")

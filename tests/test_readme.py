"""README.md is the front page: its commands are the ones CI runs, and every Python block in it
runs verbatim (copied into a fresh file, run from an empty folder) and prints what the text says."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_is_a_front_page():
    assert len(README.encode("utf-8")) <= 16_000, "README.md is the front page: keep it under 16 KB"
    assert "arXiv:2305.15267" in README and "@inproceedings" in README  # the paper, cited
    assert len(BLOCKS) >= 2


def test_the_ci_script_runs_the_readme_test_command():
    commands = [line.strip() for line in README.splitlines()[:12] if line.startswith("    python3 -m venv")]
    assert len(commands) == 2, "the README's first lines give two commands: install+train, and the tests"
    install_and_train, tests = commands
    assert install_and_train.endswith("ebflow train")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert tests in ci.splitlines()


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs_verbatim(index, tmp_path):
    code = BLOCKS[index]
    ast.parse(code)  # a syntax error is reported as such, not as a failed run
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, f"README block {index} failed:\n{code}\n--- stderr ---\n{out.stderr}"
    if "images.nll(test)" in code:
        # the tour: an exact pixel-space NLL near the one the README quotes (about 106.3 nats)
        result = ast.literal_eval(out.stdout.strip().splitlines()[-1])
        assert result["n"] == 300
        assert 100 < result["nll"] < 110, result
        assert result["bpd"] == pytest.approx(result["nll"] / (64 * 0.6931471805599453))


def test_getting_started_session_runs(tmp_path):
    """docs/getting-started.md's Python blocks, in order, as one session (the block that loads a
    run directory of the reader's own is left out: its path is a placeholder)."""
    page = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "load_run(" not in b]
    assert len(blocks) >= 4
    script = tmp_path / "getting_started.py"
    script.write_text("\n".join(blocks), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    assert "torch.Size([5, 1, 8, 8])" in out.stdout
    assert "'n': 300" in out.stdout and "torch.Size([16, 1, 8, 8])" in out.stdout

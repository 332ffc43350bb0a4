"""The wheel: built from a copy of the source tree, installed into a fresh virtual environment
(reusing this one's packages, no download), then used from outside the source tree: ``import
ebflow`` is the installed copy, the package data is in it, and ``ebflow train`` finishes."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from helpers import TINY_CLI, cli_sets

ROOT = Path(__file__).resolve().parents[1]
#: What the wheel must carry besides the modules (paths inside the wheel).
PACKAGE_DATA = [
    "ebflow/py.typed",
    "ebflow/datasets/digits.npz",
    "ebflow/datasets/NOTICE",
    "ebflow/experiment/config/presets/digits-fc.yaml",
]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (the checkout gets no build/ or egg-info)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "source"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            work / "dist",
            ".",
        ],
        cwd=src,
    )
    (found,) = (work / "dist").glob("ebflow-*.whl")
    return found


def test_wheel_carries_the_package_data_the_licence_and_optional_extras(wheel):
    """Fails when py.typed, the digits, their notice or a preset is left out of the wheel, when the
    licence is not SPDX with its file, or when an optional package becomes a hard dependency."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = z.read(meta).decode()
    missing = [p for p in PACKAGE_DATA if p not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert sum(n.startswith("ebflow/experiment/config/presets/") and n.endswith(".yaml") for n in names) >= 5
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    lines = metadata.splitlines()
    assert "License-Expression: MIT" in lines and "Classifier: Typing :: Typed" in lines
    hard = sorted(
        line.split(":", 1)[1].strip()
        for line in lines
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    )
    assert [h.split(">=")[0] for h in hard] == ["numpy", "pillow", "pyyaml", "torch", "tqdm"], hard
    for extra in ("plots", "tensorboard", "vision", "docs", "all", "test"):
        assert f"Provides-Extra: {extra}" in lines


def test_installed_wheel_imports_and_trains_from_outside_the_source_tree(wheel, tmp_path):
    """Fails when the installed package misses a module or data file that the checkout has
    (import ebflow would otherwise find the source tree), or ``ebflow train`` does not run."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], cwd=tmp_path)
    purelib = Path(
        _run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            cwd=tmp_path,
        ).strip()
    )
    if sys.prefix != sys.base_prefix:  # this interpreter is a venv itself: reuse its packages (torch)
        outer = [p for p in [*site.getsitepackages(), sysconfig.get_path("purelib")] if Path(p).is_dir()]
        (purelib / "_outer_env.pth").write_text("\n".join(dict.fromkeys(outer)) + "\n")
    # --ignore-installed: never touch an ebflow installed in the reused environments
    _run(
        [
            venv / "bin" / "python",
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            "--disable-pip-version-check",
            "--quiet",
            wheel,
        ],
        cwd=tmp_path,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", EBFLOW_DATA_DIR=str(tmp_path / "data"))
    code = """
import json, ebflow, ebflow.datasets
from importlib import resources
x, _ = ebflow.datasets.load_digits()
files = resources.files("ebflow")
presets = sorted(p.name for p in files.joinpath("experiment", "config", "presets").iterdir())
print(json.dumps({"file": ebflow.__file__, "digits": list(x.shape), "presets": presets,
                  "typed": files.joinpath("py.typed").is_file()}))
"""
    out = json.loads(
        _run([venv / "bin" / "python", "-c", code], cwd=tmp_path, env=env).strip().splitlines()[-1]
    )
    assert Path(out["file"]).resolve().is_relative_to(purelib.resolve()), out["file"]
    assert out["digits"] == [1797, 1, 8, 8] and out["typed"] and "digits-fc.yaml" in out["presets"]
    run = tmp_path / "run"
    _run([venv / "bin" / "ebflow", "train", "--out", run, *cli_sets(TINY_CLI)], cwd=tmp_path, env=env)
    results = json.loads((run / "results.json").read_text())
    assert "test_nll" in results and results["config"] == "digits-fc"

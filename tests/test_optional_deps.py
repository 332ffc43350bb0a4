"""The optional packages (matplotlib, tensorboard, torchvision, Pillow): the library needs none of
them, the default `ebflow train` finishes without them (one warning line per missing piece),
and what cannot work without one fails with one line naming the ebflow extra. Also the torch-only
picture grid and the standard-library PNG writer that replaced torchvision's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ebflow._optional import OPTIONAL, require
from ebflow.errors import EBFlowError, MissingDependencyError
from ebflow.experiment.images.picture import to_bytes, write_picture
from ebflow.images import image_grid
from helpers import TINY_CLI, cli_sets

#: The packages the tests hide: every optional one, and scikit-learn (no longer used).
HIDDEN = ("matplotlib", "tensorboard", "torchvision", "sklearn")
#: ... and, for the library alone (``import ebflow``), also Pillow, which only the command line needs.
LIBRARY_HIDDEN = (*HIDDEN, "PIL")
ROOT = Path(__file__).resolve().parents[1]


def _run_hidden(
    code: str, *args: str, cwd: Path, hidden: tuple[str, ...] = HIDDEN
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing any of ``hidden`` (or a submodule)
    fails, as if not installed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    hide = f"import sys\nsys.modules.update(dict.fromkeys({hidden!r}))\n"
    return subprocess.run(
        [sys.executable, "-c", hide + code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def _hide_in_process(monkeypatch, *names: str) -> None:
    """Make ``import name`` (and its submodules, even ones imported already) fail here."""
    for key in list(sys.modules):
        if key in names or key.startswith(tuple(n + "." for n in names)):
            monkeypatch.setitem(sys.modules, key, None)
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


# -- the helper ---------------------------------------------------------------------------------------
def test_require_names_the_package_and_the_extra(monkeypatch):
    """Fails when a missing package gives a raw ImportError or a message without the extra."""
    _hide_in_process(monkeypatch, "matplotlib")
    with pytest.raises(MissingDependencyError) as info:
        require("matplotlib.pyplot", purpose="curves.png")
    assert str(info.value) == "curves.png needs matplotlib: pip install 'ebflow[plots]'"
    assert isinstance(info.value, ImportError) and isinstance(info.value, EBFlowError)
    assert {extra for _, extra in OPTIONAL.values()} == {"plots", "tensorboard", "vision"}
    with pytest.raises(KeyError, match="optional"):
        require("scipy", purpose="x")


# -- the library -------------------------------------------------------------------------------------------
def test_the_library_works_with_torch_and_numpy_only(tmp_path):
    """Fails when importing ebflow (or a library module) or using a model, the digits, the
    inpainting or its grid imports matplotlib, tensorboard, torchvision, Pillow or scikit-learn."""
    code = """
import json
import torch
import ebflow, ebflow.layers, ebflow.objectives, ebflow.mcmc, ebflow.preprocessing, ebflow.images
from ebflow.datasets import load_digits
from ebflow.inpainting import inpaint_images, inpainting_grid, make_mask
torch.manual_seed(0)
x, y = load_digits()
pre = ebflow.ImagePreprocessing(num_bins=17)
model = ebflow.dense_flow((1, 8, 8))
z, _ = pre.forward(pre.dequantize(x[:8]))
logp = model.log_prob(z)
loss = ebflow.make_objective("ssm")(model, z)
samples = model.sample(4)
result = inpaint_images(model, pre, x[:3], make_mask("top", (1, 8, 8)), steps=2,
                        generator=torch.Generator().manual_seed(0))
grid = inpainting_grid(result, max_value=16)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN and sys.modules[m] is not None)
print(json.dumps({"logp": logp.shape[0], "finite": bool(logp.isfinite().all() and loss.isfinite()),
                  "samples": list(samples.shape), "grid": list(grid.shape), "loaded": loaded,
                  "file": ebflow.__file__}))
""".replace("HIDDEN", repr(LIBRARY_HIDDEN))
    proc = _run_hidden(code, cwd=tmp_path, hidden=LIBRARY_HIDDEN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["logp"] == 8 and out["finite"] and out["samples"] == [4, 1, 8, 8]
    assert out["grid"] == [3, 3 * 66 + 2, 3 * 66 + 2] and out["loaded"] == []
    assert Path(out["file"]).is_relative_to(ROOT / "src")


# -- the application ----------------------------------------------------------------------------------------
def test_default_train_without_optional_packages_finishes_with_one_warning_per_missing_piece(tmp_path):
    """Fails when the default (digits) run needs matplotlib / tensorboard / torchvision to
    finish, loses results.json or samples.png for them, or warns more than once per missing piece
    (curves.png is tried at every validation: here 3)."""
    run = tmp_path / "run"
    sets = [s for s in TINY_CLI if not s.startswith(("tensorboard=", "eval_every="))] + ["eval_every=2"]
    code = "from ebflow.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = _run_hidden(code, "train", "--out", str(run), *cli_sets(sets), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, proc.stderr
    assert sum("pip install 'ebflow[tensorboard]'" in w and "TensorBoard" in w for w in warnings) == 1
    assert sum("curves.png needs matplotlib: pip install 'ebflow[plots]'" in w for w in warnings) == 1
    assert "Traceback" not in proc.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["checkpoint_step"] >= 0 and "test_nll" in results
    assert (run / "samples.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not (run / "curves.png").exists() and not (run / "tensorboard").exists()


def test_tensorboard_missing_warns_once_and_the_csv_goes_on(tmp_path, monkeypatch):
    """Fails when a run asking for TensorBoard without the package raises instead of warning."""
    from ebflow.experiment.rundir.metrics import MetricsLog

    _hide_in_process(monkeypatch, "tensorboard", "torch.utils.tensorboard")
    with pytest.warns(RuntimeWarning, match=r"pip install 'ebflow\[tensorboard\]'"):
        log = MetricsLog(tmp_path, None, tensorboard=True)
    assert log.writer is None
    log.log(1, {"loss": 1.5})
    log.log_images(1, torch.rand(4, 1, 8, 8))
    log.close()
    assert "1.5" in (tmp_path / "metrics.csv").read_text()


def test_mnist_download_without_torchvision_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    """Fails when MNIST files that must be downloaded give a raw ImportError (or a message without
    ``ebflow[vision]`` and the files to fetch by hand) when torchvision is missing, or when the
    local files stop loading without torchvision."""
    from ebflow.cli import main
    from ebflow.experiment.config.resolve import resolve_config
    from ebflow.experiment.data.datasets import load_data

    _hide_in_process(monkeypatch, "torchvision")
    empty = tmp_path / "data"
    empty.mkdir()
    config = resolve_config("mnist-fc", {"data_dir": str(empty), "download": True}).data
    with pytest.raises(MissingDependencyError) as info:
        load_data(config)
    msg = str(info.value)
    assert "\n" not in msg and "pip install 'ebflow[vision]'" in msg and "mnist" in msg
    assert "train-images-idx3-ubyte" in msg and str(empty) in msg and list(empty.iterdir()) == []
    code = main(
        ["train", "--config", "mnist-fc", "--out", str(tmp_path / "run"), "--set", f"data_dir={empty}"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "ebflow[vision]" in err[0]
    assert not (tmp_path / "run").exists()
    local = tmp_path / "local"  # files on disk need no torchvision
    local.mkdir()
    for stem, shape in (
        ("train-images-idx3-ubyte", (60, 28, 28)),
        ("train-labels-idx1-ubyte", (60,)),
        ("t10k-images-idx3-ubyte", (20, 28, 28)),
        ("t10k-labels-idx1-ubyte", (20,)),
    ):
        header = bytes([0, 0, 8, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)
        (local / stem).write_bytes(header + bytes(int(torch.tensor(shape).prod())))
    d = load_data(resolve_config("mnist-fc", {"data_dir": str(local), "val_size": 10}).data)
    assert d.train.shape == (50, 1, 28, 28)


def test_plots_name_their_extra(tmp_path, monkeypatch):
    """Fails when a plot without matplotlib is not a one-line MissingDependencyError naming the
    extra."""
    from ebflow.experiment.images.plots import save_curves
    from ebflow.experiment.reproduce.report import plot_curves

    _hide_in_process(monkeypatch, "matplotlib")
    (tmp_path / "metrics.csv").write_text("step,loss\n1,2.0\n")
    with pytest.raises(
        MissingDependencyError, match=r"^curves.png needs matplotlib: pip install 'ebflow\[plots\]'$"
    ):
        save_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    with pytest.raises(MissingDependencyError, match=r"ebflow\[plots\]"):
        plot_curves(
            [{"curve": [(1.0, 2.0)], "cell": "a", "paper": None, "metric": "nll"}], tmp_path / "p.png", "t"
        )
    assert not (tmp_path / "curves.png").exists()


# -- the picture grid and the PNG writer ------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_image_grid_is_torchvisions_make_grid(channels):
    """Fails when the torch-only grid draws a different picture from torchvision's (which
    ``samples.png``, TensorBoard and the inpainting grid used before)."""
    make_grid = pytest.importorskip("torchvision.utils").make_grid
    x = torch.rand(7, channels, 5, 6)
    for nrow, padding, pad in ((3, 2, 0.5), (8, 1, 0.0), (1, 0, 1.0)):
        assert torch.equal(
            image_grid(x, nrow, padding=padding, pad_value=pad),
            make_grid(x, nrow=nrow, padding=padding, pad_value=pad),
        )


def test_image_grid_layout_and_bad_input():
    x = torch.arange(2 * 1 * 2 * 2, dtype=torch.float64).reshape(2, 1, 2, 2)
    grid = image_grid(x, 2, padding=1, pad_value=-1)
    assert grid.shape == (3, 4, 7) and grid.dtype == torch.float64
    assert torch.equal(grid[0, 1:3, 1:3], x[0, 0]) and torch.equal(grid[2, 1:3, 4:6], x[1, 0])
    assert (grid[:, 0] == -1).all() and (grid[:, :, 3] == -1).all()
    assert image_grid(torch.rand(1, 3, 4, 4), padding=2).shape == (3, 8, 8)  # one image is padded too
    for bad in (torch.rand(3, 4, 4), torch.rand(0, 1, 4, 4)):
        with pytest.raises(EBFlowError, match="image_grid"):
            image_grid(bad)
    with pytest.raises(EBFlowError, match="nrow"):
        image_grid(torch.rand(2, 1, 2, 2), 0)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png_pictures_round_trip(tmp_path, channels):
    """Fails for a PNG whose pixels are not the picture's (read back by Pillow), or a write that
    leaves a temporary file behind."""
    import numpy as np
    from PIL import Image

    image = torch.rand(channels, 5, 7)
    pixels = to_bytes(image)
    out = write_picture(tmp_path / "sub" / "p.png", image)
    assert not list(out.parent.glob(".*tmp"))
    with Image.open(out) as img:
        arr = torch.from_numpy(np.array(img)).reshape(5, 7, channels).permute(2, 0, 1)
    assert torch.equal(arr, pixels)
    jpeg = write_picture(tmp_path / "p.jpg", image)
    with Image.open(jpeg) as img:
        assert img.format == "JPEG" and img.size == (7, 5)
    with pytest.raises(EBFlowError, match=r"\.png or \.jpg"):
        write_picture(tmp_path / "p.bmp", image)

"""Image data sets: the 8x8 digits shipped with ebflow, MNIST / Fashion-MNIST (IDX files) and
CIFAR-10 (python batches) from local files or a torchvision download (the ``vision`` extra), and
generated stand-ins with their shapes. Images are raw pixel levels ``0 .. num_bins-1``, float32
``(N, C, H, W)``. An explicit ``data_dir`` must exist: it is never created."""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..._optional import require
from ...datasets import load_digits
from ...errors import ConfigError, InputError, MissingDependencyError
from ..config.sections import DataConfig
from .splits import DataSplits, DataUnavailableError

__all__ = ["IMAGE_LOADERS", "default_data_dir", "mnist_like", "read_idx"]

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
DOWNLOAD_HINTS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/ (or http://yann.lecun.com/exdb/mnist/)",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (unpack it)",
}
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def default_data_dir() -> Path:
    """``$EBFLOW_DATA_DIR`` or ``~/.cache/ebflow/data``."""
    return Path(os.environ.get("EBFLOW_DATA_DIR", "~/.cache/ebflow/data")).expanduser()


def _synthetic_images(config: DataConfig, shape: tuple[int, ...], name: str) -> DataSplits:
    """Random smooth blob images with 256 levels: a stand-in with MNIST / CIFAR-10 shapes."""
    g = torch.Generator().manual_seed(config.data_seed)
    n_train = config.max_train or 200
    n_eval = config.max_eval or 50

    def make(n: int) -> Tensor:
        c, h, w = shape
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        centre = torch.rand(n, c, 2, generator=g) - 0.5
        width = 0.2 + 0.4 * torch.rand(n, c, 1, 1, generator=g)
        d2 = (xx - centre[..., 0, None, None]) ** 2 + (yy - centre[..., 1, None, None]) ** 2
        img = 255 * torch.exp(-d2 / (2 * width**2)) + 20 * torch.rand(n, c, h, w, generator=g)
        return img.clamp(0, 255).floor()

    return DataSplits(name, make(n_train), make(n_eval), make(n_eval), "image", num_bins=256)


# -- the 8x8 digits (shipped with ebflow) -----------------------------------------------------------
def _digits(config: DataConfig) -> DataSplits:
    """:func:`ebflow.datasets.load_digits` shuffled by ``data_seed``: 297 test images, then
    ``val_size`` (300) validation images, the rest (1200) for training."""
    images, _ = load_digits()  # (1797, 1, 8, 8), levels 0..16
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(config.data_seed))
    images = images[perm]
    n_test, n_val = 297, config.val_size or 300
    test, val, train = images[:n_test], images[n_test : n_test + n_val], images[n_test + n_val :]
    return DataSplits("digits", train, val, test, "image", num_bins=17)


# -- MNIST-style IDX files ---------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed) of unsigned bytes into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise InputError(f"cannot read {str(path)!r}: {err} (truncated or corrupted download?)") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{str(path)!r} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise InputError(
            f"{str(path)!r} has {len(raw)} bytes but its header announces {expected} "
            "(truncated or corrupted file)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_file(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _mnist_folders(root: Path, name: str) -> list[Path]:
    tv = TORCHVISION_FOLDERS[name]
    return [root, root / "raw", root / tv / "raw", root / tv]


def _missing_error(name: str, root: Path, files: list[str], reason: str) -> DataUnavailableError:
    return DataUnavailableError(
        f"{name} data not found in {str(root)!r} ({reason}). Download "
        f"{', '.join(files)} from {DOWNLOAD_HINTS[name]} and put them in that folder "
        f"(or pass --set data_dir=PATH to a folder that holds them)."
    )


def _data_root(config: DataConfig, name: str) -> Path:
    """``data_dir``, which must exist (never created, nor downloaded into), else the default folder."""
    if config.data_dir and not Path(config.data_dir).expanduser().is_dir():
        raise DataUnavailableError(
            f"config key 'data_dir': {config.data_dir!r} is not an existing folder; fix the "
            f"path, or create it to put (or download) the {name} files there"
        )
    return Path(config.data_dir).expanduser() if config.data_dir else default_data_dir()


def _download(name: str, root: Path, files: list[str]) -> None:
    """Download ``name`` into ``root`` with torchvision; without torchvision, a one-line
    :class:`MissingDependencyError` naming ``ebflow[vision]`` and the files to fetch by hand."""
    try:
        tvd = require("torchvision.datasets", purpose="downloading it")
    except MissingDependencyError as err:
        raise MissingDependencyError(
            f"{name} data not found in {str(root)!r}, and {err}; or download {', '.join(files)} from "
            f"{DOWNLOAD_HINTS[name]} and put them in that folder (or pass --set data_dir=PATH)",
            name=err.name,
        ) from err
    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        cls(str(root), train=train, download=True)


def mnist_like(config: DataConfig, name: str) -> DataSplits:
    """MNIST or Fashion-MNIST (``name``) from its IDX files (downloaded when missing and allowed):
    the last ``val_size`` (10,000) training images validate, the others train; the test file tests."""
    root = _data_root(config, name)
    paths = {k: _find_file(_mnist_folders(root, name), stem) for k, stem in MNIST_FILES.items()}
    if any(p is None for p in paths.values()):
        missing = [MNIST_FILES[k] + "(.gz)" for k, p in paths.items() if p is None]
        if not config.download:
            raise _missing_error(name, root, missing, "download disabled")
        try:
            _download(name, root, missing)
        except MissingDependencyError:
            raise
        except Exception as err:  # any network failure means the same to the user
            raise _missing_error(name, root, missing, f"download failed: {err}") from err
        paths = {k: _find_file(_mnist_folders(root, name), stem) for k, stem in MNIST_FILES.items()}
        if any(p is None for p in paths.values()):
            raise _missing_error(name, root, missing, "not found after download")
    train_path, test_path = paths["train_images"], paths["test_images"]
    assert train_path is not None and test_path is not None  # every file was found above
    train = read_idx(train_path)
    test = read_idx(test_path)
    for arr, key in ((train, "train_images"), (test, "test_images")):
        if arr.ndim != 3:
            raise InputError(f"{str(paths[key])!r} must hold images (N, H, W), got shape {arr.shape}")
    n_val = config.val_size or 10000
    if n_val >= train.shape[0]:
        raise ConfigError(
            f"config key 'val_size' ({n_val}) must be smaller than the {train.shape[0]} training images"
        )
    tr = torch.from_numpy(train.astype(np.float32)).unsqueeze(1)
    te = torch.from_numpy(test.astype(np.float32)).unsqueeze(1)
    # The last val_size training images form the validation set (50k / 10k for MNIST).
    return DataSplits(name, tr[:-n_val], tr[-n_val:], te, "image", num_bins=256)


# -- CIFAR-10 python batches ----------------------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches: plain containers and numpy arrays only, nothing executable."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _read_cifar_batch(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
    except Exception as err:  # a damaged pickle raises anything
        raise InputError(f"cannot read CIFAR-10 batch {str(path)!r}: {err} (corrupted file?)") from err
    if data.ndim != 2 or data.shape[1] != 3072:
        raise InputError(f"CIFAR-10 batch {str(path)!r} must hold (N, 3072) bytes, got {data.shape}")
    return data.reshape(-1, 3, 32, 32)


def _cifar10(config: DataConfig) -> DataSplits:
    root = _data_root(config, "cifar10")
    folders = [root / "cifar-10-batches-py", root]

    def locate() -> Path | None:
        return next((f for f in folders if all((f / n).is_file() for n in CIFAR_FILES)), None)

    folder = locate()
    if folder is None:
        if not config.download:
            raise _missing_error("cifar10", root, CIFAR_FILES, "download disabled")
        try:
            _download("cifar10", root, CIFAR_FILES)
        except MissingDependencyError:
            raise
        except Exception as err:  # any network failure means the same to the user
            raise _missing_error("cifar10", root, CIFAR_FILES, f"download failed: {err}") from err
        folder = locate()
        if folder is None:
            raise _missing_error("cifar10", root, CIFAR_FILES, "not found after download")
    train = np.concatenate([_read_cifar_batch(folder / n) for n in CIFAR_FILES[:5]])
    test = _read_cifar_batch(folder / "test_batch")
    n_val = config.val_size or 5000
    if n_val >= train.shape[0]:
        raise ConfigError(
            f"config key 'val_size' ({n_val}) must be smaller than the {train.shape[0]} training images"
        )
    tr = torch.from_numpy(train.astype(np.float32))
    te = torch.from_numpy(test.astype(np.float32))
    return DataSplits("cifar10", tr[:-n_val], tr[-n_val:], te, "image", num_bins=256)


IMAGE_LOADERS: dict[str, Callable[[DataConfig], DataSplits]] = {
    "digits": _digits,
    "mnist": lambda c: mnist_like(c, "mnist"),
    "fashion-mnist": lambda c: mnist_like(c, "fashion-mnist"),
    "cifar10": _cifar10,
    "synthetic-mnist": lambda c: _synthetic_images(c, (1, 28, 28), "synthetic-mnist"),
    "synthetic-cifar10": lambda c: _synthetic_images(c, (3, 32, 32), "synthetic-cifar10"),
}
"""Loaders of the image data sets by config name."""

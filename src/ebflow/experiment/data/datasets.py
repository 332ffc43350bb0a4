"""Data sets: generated 2-D toys and 10-D mm10, scikit-learn digits, MNIST / Fashion-MNIST /
CIFAR-10 (local files or a torchvision download), generated stand-ins, and ``.npy`` point files.

Every loader returns a :class:`DataSplits` of float tensors: images as raw pixel levels
``0 .. num_bins-1`` with shape ``(N, C, H, W)``, points as ``(N, D)``. Data holding NaN or Inf
is rejected here, at load time. An explicit ``data_dir`` must exist: it is never created."""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...errors import ConfigError, EBFlowError, InputError
from ..config.sections import DataConfig

__all__ = ["DataSplits", "DataUnavailableError", "IMAGE_DATASETS", "LOADERS", "TOY2D_DATASETS", "ToyMixture",
           "load_data", "check_data", "toy2d_base_points", "mm10_sample", "read_idx", "default_data_dir"]

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


class DataUnavailableError(EBFlowError, FileNotFoundError):
    """A data set is neither on disk nor downloadable; the message says what to fetch and where."""


@dataclass
class ToyMixture:
    r"""The density of smoothed toy data: :math:`p(x) = \frac1n\sum_i \mathcal N(x; c_i, s^2 I)`."""

    centres: Tensor
    noise: float


@dataclass
class DataSplits:
    """Train / validation / test tensors and what they are."""

    name: str
    train: Tensor
    val: Tensor
    test: Tensor
    kind: str  # "image" or "points"
    num_bins: int | None = None
    mixture: ToyMixture | None = None
    #: std of fresh Gaussian noise to add to every training batch (2-D toys: ``train`` holds the
    #: clean base points and the smoothing is drawn anew each step, as in the reference code)
    train_noise: float | None = None

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    def split(self, name: str) -> Tensor:
        """One split by name: ``train``, ``val`` or ``test``."""
        if name not in ("train", "val", "test"):
            raise ConfigError(f"unknown data split {name!r}; choose train, val or test")
        return getattr(self, name)


def check_data(x: Tensor, what: str) -> Tensor:
    """Reject empty or non-finite data with a clear :class:`InputError`."""
    if x.numel() == 0 or x.shape[0] == 0:
        raise InputError(f"{what} is empty")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = bad.reshape(x.shape[0], -1).any(dim=1).nonzero().flatten()
        raise InputError(
            f"{what} contains non-finite values ({int(torch.isnan(x).sum())} NaN, "
            f"{int(torch.isinf(x).sum())} Inf) in {rows.numel()} example(s), first at index "
            f"{int(rows[0])}; clean the data before training"
        )
    return x


def default_data_dir() -> Path:
    """``$EBFLOW_DATA_DIR`` or ``~/.cache/ebflow/data``."""
    return Path(os.environ.get("EBFLOW_DATA_DIR", "~/.cache/ebflow/data")).expanduser()


# -- generated data --------------------------------------------------------------------------------
def toy2d_base_points(name: str, n: int, generator: torch.Generator) -> Tensor:
    r"""The ``n`` clean base points of a 2-D toy (float64), the reference code's generators:

    * ``sine``: :math:`u \sim U[-2, 2]`, :math:`(4u,\ 4\sin 3u + \mathcal N(0, 1))`;
    * ``swirl``: :math:`n = 3\pi\sqrt{v}`, :math:`v \sim U[0, 1]`,
      :math:`\tfrac56(n\cos n + 1 - a/2,\ 2 - n\sin n - b/2)`, :math:`a, b \sim U[0, 1]`;
    * ``checkerboard``: :math:`x_1 \sim U[-2, 2]`, :math:`x_2 = u - 2k + (\lfloor x_1 \rfloor
      \bmod 2)`, :math:`u \sim U[0, 1]`, :math:`k \in \{0, 1\}`, times 3: 8 squares of side 3
      on :math:`[-6, 6]^2`."""
    g = generator

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    if name == "sine":
        u = uniform(n) * 4 - 2
        y = torch.sin(3 * u) + 0.25 * torch.randn(n, generator=g, dtype=torch.float64)
        return 4.0 * torch.stack([u, y], dim=1)
    if name == "swirl":
        t = uniform(n).sqrt() * 3 * math.pi  # 540 degrees
        dx = -torch.cos(t) * t + uniform(n) * 0.5 - 1.0
        dy = torch.sin(t) * t + uniform(n) * 0.5 - 2.0
        return -2.5 / 3 * torch.stack([dx, dy], dim=1)
    if name == "checkerboard":
        x1 = uniform(n) * 4 - 2
        k = torch.randint(0, 2, (n,), generator=g).to(torch.float64)
        x2 = uniform(n) - 2 * k + torch.remainder(torch.floor(x1), 2)
        return 3.0 * torch.stack([x1, x2], dim=1)
    raise ConfigError(f"unknown 2-D toy {name!r}; choose sine, swirl or checkerboard")


def _mixture_samples(mix: ToyMixture, n: int, g: torch.Generator) -> Tensor:
    """``n`` samples of the mixture: every centre once when ``n`` equals their number (the
    reference's test points), else centres drawn uniformly; plus fresh smoothing noise."""
    m = mix.centres.shape[0]
    idx = torch.arange(n) if n == m else torch.randint(0, m, (n,), generator=g)
    return mix.centres[idx] + mix.noise * torch.randn(n, mix.centres.shape[1], generator=g,
                                                       dtype=mix.centres.dtype)


def _toy2d(config: DataConfig) -> DataSplits:
    """Clean training base points (``toy_train_size``; smoothing noise is added afresh every
    training step); the evaluation density is the smoothing of a separate set of
    ``toy_points`` base points, and validation / test are independent samples of it."""
    kind = config.dataset.split("-", 1)[1]
    g = torch.Generator().manual_seed(config.data_seed)
    train = toy2d_base_points(kind, config.toy_train_size, g)
    mix = ToyMixture(toy2d_base_points(kind, config.toy_points, g), float(config.toy_noise))
    val = _mixture_samples(mix, config.toy_eval_size, g)
    test = _mixture_samples(mix, config.toy_eval_size, g)
    return DataSplits(config.dataset, train, val, test, "points", mixture=mix,
                      train_noise=float(config.toy_noise))


def mm10_sample(n: int, generator: torch.Generator) -> Tensor:
    r"""10-D multimodal data, the reference code's tanh autoregressive process:
    :math:`y_0 = z_0`, :math:`y_i = \tanh(5 z_i)\,(y_{i-1} + 2^{i+1})` for :math:`i = 1..9`,
    :math:`z \sim \mathcal N(0, I)` (float64). Each :math:`\tanh(5 z_i)` is near :math:`\pm 1`:
    two modes per coordinate."""
    z = torch.randn(n, 10, generator=generator, dtype=torch.float64)
    cols = [z[:, 0]]
    for i in range(1, 10):
        cols.append(torch.tanh(5 * z[:, i]) * (cols[-1] + 2.0 * 2**i))
    return torch.stack(cols, dim=1)


def _mm10(config: DataConfig) -> DataSplits:
    g = torch.Generator().manual_seed(config.data_seed)
    train = mm10_sample(config.toy_train_size, g)
    val = mm10_sample(config.toy_eval_size, g)
    test = mm10_sample(config.toy_eval_size, g)
    return DataSplits("mm10", train, val, test, "points")


def _split_points(x: Tensor, seed: int, name: str) -> DataSplits:
    n = x.shape[0]
    if n < 10:
        raise InputError(f"{name} holds {n} points; at least 10 are needed to split 80/10/10")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = n_test = max(1, n // 10)
    x = x[perm]
    return DataSplits(name, x[n_val + n_test:], x[:n_val], x[n_val:n_val + n_test], "points")


def _points_file(config: DataConfig) -> DataSplits:
    path = Path(config.data_file).expanduser()
    if not path.is_file():
        raise DataUnavailableError(f"data_file {str(path)!r} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
        real = isinstance(arr, np.ndarray) and (np.issubdtype(arr.dtype, np.floating)
                                                or np.issubdtype(arr.dtype, np.integer))
    except (ValueError, OSError, EOFError, SyntaxError, UnicodeDecodeError, MemoryError) as err:
        raise InputError(f"cannot read {str(path)!r} as a .npy array of numbers: {err}") from err
    if not real or arr.ndim != 2 or arr.shape[1] < 2:
        what = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise InputError(f"{str(path)!r} must hold an (N, D) array of real numbers (integer or float) "
                         f"with D >= 2 dimensions, got {what}")
    x = torch.from_numpy(arr.astype(np.float64))
    check_data(x, f"data file {str(path)!r}")
    return _split_points(x, config.data_seed, "points")


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


# -- scikit-learn digits -----------------------------------------------------------------------------
def _digits(config: DataConfig) -> DataSplits:
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images.astype(np.float32)).unsqueeze(1)  # 0..16
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(config.data_seed))
    images = images[perm]
    n_test, n_val = 297, config.val_size or 300
    test, val, train = images[:n_test], images[n_test:n_test + n_val], images[n_test + n_val:]
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
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
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
        raise DataUnavailableError(f"config key 'data_dir': {config.data_dir!r} is not an existing folder; fix the "
                                   f"path, or create it to put (or download) the {name} files there")
    return Path(config.data_dir).expanduser() if config.data_dir else default_data_dir()


def _download(name: str, root: Path) -> None:
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        cls(str(root), train=train, download=True)


def _mnist_like(config: DataConfig, name: str) -> DataSplits:
    root = _data_root(config, name)
    paths = {k: _find_file(_mnist_folders(root, name), stem) for k, stem in MNIST_FILES.items()}
    if any(p is None for p in paths.values()):
        missing = [MNIST_FILES[k] + "(.gz)" for k, p in paths.items() if p is None]
        if not config.download:
            raise _missing_error(name, root, missing, "download disabled")
        try:
            _download(name, root)
        except Exception as err:  # noqa: BLE001 - any network failure means the same to the user
            raise _missing_error(name, root, missing, f"download failed: {err}") from err
        paths = {k: _find_file(_mnist_folders(root, name), stem) for k, stem in MNIST_FILES.items()}
        if any(p is None for p in paths.values()):
            raise _missing_error(name, root, missing, "not found after download")
    train = read_idx(paths["train_images"])
    test = read_idx(paths["test_images"])
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

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _read_cifar_batch(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
    except Exception as err:  # noqa: BLE001
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
            _download("cifar10", root)
        except Exception as err:  # noqa: BLE001
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


# -- entry point -------------------------------------------------------------------------------------
_IMAGE_LOADERS: dict[str, Callable[[DataConfig], DataSplits]] = {
    "digits": _digits, "mnist": lambda c: _mnist_like(c, "mnist"),
    "fashion-mnist": lambda c: _mnist_like(c, "fashion-mnist"), "cifar10": _cifar10,
    "synthetic-mnist": lambda c: _synthetic_images(c, (1, 28, 28), "synthetic-mnist"),
    "synthetic-cifar10": lambda c: _synthetic_images(c, (3, 32, 32), "synthetic-cifar10"),
}
#: The 2-D toy data sets (fresh smoothing noise per training batch).
TOY2D_DATASETS: tuple[str, ...] = ("toy2d-sine", "toy2d-swirl", "toy2d-checkerboard")
#: The image data sets (pixel levels, dequantisation, logit preprocessing).
IMAGE_DATASETS: tuple[str, ...] = tuple(_IMAGE_LOADERS)
#: Data set loaders by config name (``data``): the config's choices are this table's names.
LOADERS: dict[str, Callable[[DataConfig], DataSplits]] = {
    **{name: _toy2d for name in TOY2D_DATASETS}, "mm10": _mm10, "points": _points_file, **_IMAGE_LOADERS,
}


def load_data(config: DataConfig, *, num_bins: int | None = None) -> DataSplits:
    """Load (or generate) the data set of a validated config's data section, checked for NaN /
    Inf; image pixels must lie below ``num_bins`` (the config's ``num_bins``) when it is given."""
    name = config.dataset
    splits = LOADERS[name](config)
    if config.max_train:
        splits.train = splits.train[: config.max_train]
    if config.max_eval:
        splits.val = splits.val[: config.max_eval]
        splits.test = splits.test[: config.max_eval]
    for split in ("train", "val", "test"):
        check_data(splits.split(split), f"{name} {split} data")
    if splits.kind == "image" and num_bins:
        top = float(max(splits.train.max(), splits.val.max(), splits.test.max()))
        if top > num_bins - 1:
            raise ConfigError(f"config key 'num_bins' is {num_bins} but the {name} pixels reach {top:g}")
    return splits

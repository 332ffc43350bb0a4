"""Point data: the 2-D toys (sine, swirl, checkerboard) and 10-D mm10, generated as in the
reference code, and ``.npy`` files of points (``data_file``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...errors import ConfigError, InputError
from ..config.sections import DataConfig
from .splits import DataSplits, DataUnavailableError, ToyMixture, check_data

__all__ = ["POINT_LOADERS", "TOY2D_DATASETS", "mm10_sample", "toy2d_base_points"]


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
    return mix.centres[idx] + mix.noise * torch.randn(
        n, mix.centres.shape[1], generator=g, dtype=mix.centres.dtype
    )


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
    return DataSplits(
        config.dataset, train, val, test, "points", mixture=mix, train_noise=float(config.toy_noise)
    )


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
    return DataSplits(name, x[n_val + n_test :], x[:n_val], x[n_val : n_val + n_test], "points")


def _points_file(config: DataConfig) -> DataSplits:
    if not config.data_file:  # validate_config checks it; a DataConfig built by hand may not
        raise ConfigError("config key 'data_file' must name a .npy file when data is 'points'")
    path = Path(config.data_file).expanduser()
    if not path.is_file():
        raise DataUnavailableError(f"data_file {str(path)!r} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
        real = isinstance(arr, np.ndarray) and (
            np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
        )
    except (ValueError, OSError, EOFError, SyntaxError, UnicodeDecodeError, MemoryError) as err:
        raise InputError(f"cannot read {str(path)!r} as a .npy array of numbers: {err}") from err
    if not real or arr.ndim != 2 or arr.shape[1] < 2:
        what = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise InputError(
            f"{str(path)!r} must hold an (N, D) array of real numbers (integer or float) "
            f"with D >= 2 dimensions, got {what}"
        )
    x = torch.from_numpy(arr.astype(np.float64))
    check_data(x, f"data file {str(path)!r}")
    return _split_points(x, config.data_seed, "points")


#: The 2-D toy data sets (fresh smoothing noise per training batch).
TOY2D_DATASETS: tuple[str, ...] = ("toy2d-sine", "toy2d-swirl", "toy2d-checkerboard")
#: Loaders of the point data sets by config name.
POINT_LOADERS: dict[str, Callable[[DataConfig], DataSplits]] = {
    **dict.fromkeys(TOY2D_DATASETS, _toy2d),
    "mm10": _mm10,
    "points": _points_file,
}

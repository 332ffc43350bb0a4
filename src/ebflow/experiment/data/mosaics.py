r"""MNIST mosaics: :math:`k \times k` grids of :math:`k^2` distinct MNIST images, real data of a
larger dimension (``mnist-mosaic2``: 56x56, D = 3,136; ``mnist-mosaic3``: 84x84, D = 7,056) for
the scaling study (``ebflow reproduce scaling``). They are built from the same local IDX files
(or torchvision download) as ``mnist``, with the same error when the files are missing.

Each split is tiled from the source images of the same split of ``mnist``, so no two splits share
an image: training mosaics from the training images that ``mnist`` trains on (the first
``60,000 - val_size``), validation mosaics from its last ``val_size`` training images, test
mosaics from MNIST's test file. Position :math:`j` of a mosaic (row-major: grid row
:math:`\lfloor j/k \rfloor`, column :math:`j \bmod k`) holds one source image; no image appears
twice in a mosaic.

* **Training**: as many mosaics as source images, :math:`N`. Position :math:`j` of mosaic
  :math:`i` holds image :math:`\sigma_j(i)` for :math:`k^2` random permutations :math:`\sigma_j`,
  so every training image appears :math:`k^2` times, once at each position and each time with
  other partners. Every position therefore sees the whole MNIST training set, an epoch is as many
  steps as on MNIST (500 at batch 100), and a :math:`D^2`-parameter model gets :math:`N`
  distinct training inputs rather than :math:`N / k^2`.
* **Validation and test**: :math:`\lfloor N / k^2 \rfloor` mosaics, one random permutation cut
  into groups of :math:`k^2`: each image once (the :math:`N \bmod k^2` left over are unused), so
  the evaluated pixels are those of MNIST's own validation / test images, none counted twice,
  and an evaluation pass costs :math:`k^2` times MNIST's (a pass is :math:`O(N D^2 / k^2)`).

The mosaics depend on the config's ``data_seed`` only (default 1234; not on the training
``seed``): every cell of the study trains and is tested on the same mosaics. Pixels keep MNIST's
levels 0..255, so the dequantisation, the logit preprocessing and the exact NLL (nats per
mosaic, bits/dim) apply unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ...errors import ConfigError
from ..config.sections import DataConfig
from .image_sets import mnist_like
from .splits import DataSplits

__all__ = [
    "MOSAIC_LOADERS",
    "MOSAIC_SIZES",
    "each_once_indices",
    "mosaic_splits",
    "repeated_indices",
    "tile",
]

#: Grid size k of each mosaic data set (config ``data``).
MOSAIC_SIZES: dict[str, int] = {"mnist-mosaic2": 2, "mnist-mosaic3": 3}
_SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}  # one random stream per split
_BLOCK = 4096  # mosaics tiled at once


def repeated_indices(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    r"""``(n, k²)`` source indices: column :math:`j` a permutation :math:`\sigma_j` of
    ``range(n)``, no index twice in a row. Each column is drawn, then each row where it repeats
    an earlier column swaps its entry with the first row (in a random order) where both swapped
    rows stay distinct; at most :math:`2j < n` rows are unfit, so one exists when :math:`n \ge 2k^2`."""
    cells = k * k
    if n < 2 * cells:
        raise ConfigError(
            f"{k}x{k} mosaics with every image at every position need at least {2 * cells} source "
            f"images, got {n}"
        )
    out = np.empty((n, cells), dtype=np.int64)
    for j in range(cells):
        column = rng.permutation(n)
        clashes = np.flatnonzero((out[:, :j] == column[:, None]).any(axis=1))
        for i in clashes:
            if column[i] not in out[i, :j]:  # a swap for an earlier clash fixed this row
                continue
            for r in rng.permutation(n):
                if column[r] not in out[i, :j] and column[i] not in out[r, :j]:
                    column[i], column[r] = column[r], column[i]
                    break
        out[:, j] = column
    return out


def each_once_indices(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``(n // k², k²)`` source indices: one random permutation of ``range(n)`` cut into rows,
    each index at most once (the last ``n mod k²`` of the permutation unused)."""
    cells = k * k
    if n < cells:
        raise ConfigError(f"a {k}x{k} mosaic needs {cells} distinct images, but the split has {n}")
    return rng.permutation(n)[: (n // cells) * cells].reshape(-1, cells)


def tile(images: Tensor, indices: np.ndarray | Tensor, k: int) -> Tensor:
    """Mosaics ``(M, C, k h, k w)`` of source ``images`` ``(N, C, h, w)``: row ``i`` of ``indices``
    ``(M, k²)`` fills mosaic ``i``, its entry ``j`` the tile at grid row ``j // k``, column ``j % k``."""
    index = torch.as_tensor(indices, dtype=torch.long)
    m = index.shape[0]
    _, c, h, w = images.shape
    tiles = images[index.reshape(-1)].reshape(m, k, k, c, h, w)
    return tiles.permute(0, 3, 1, 4, 2, 5).reshape(m, c, k * h, k * w)


#: What to change when a split has too few source images for its mosaics.
_TOO_FEW = {
    "train": "lower the config key 'val_size' (the training images are the others)",
    "val": "raise the config key 'val_size'",
    "test": "the test file holds too few images",
}


def _split(images: Tensor, k: int, seed: int, split: str) -> Tensor:
    rng = np.random.default_rng([seed, k, _SPLIT_STREAMS[split]])
    n = images.shape[0]
    try:
        indices = repeated_indices(n, k, rng) if split == "train" else each_once_indices(n, k, rng)
    except ConfigError as err:
        raise ConfigError(f"{split} mosaics: {err}; {_TOO_FEW[split]}") from err
    # tiled as bytes, a block of mosaics at a time, into the float32 levels every loader returns:
    # the peak is the result (1.4 GB for 50,000 3x3 mosaics) and one block, not several copies
    source = images.to(torch.uint8)
    _, c, h, w = images.shape
    out = torch.empty((indices.shape[0], c, k * h, k * w), dtype=torch.float32)
    for start in range(0, indices.shape[0], _BLOCK):
        out[start : start + _BLOCK] = tile(source, indices[start : start + _BLOCK], k)
    return out


def mosaic_splits(sources: DataSplits, k: int, seed: int, name: str) -> DataSplits:
    """The mosaics of each split of ``sources`` (pixel levels 0..255), deterministic in ``seed``."""
    if k < 2:
        raise ConfigError(f"a mosaic needs k >= 2 images per side, got {k}")
    if sources.kind != "image" or sources.train.ndim != 4:
        raise ConfigError(f"mosaics need image data (N, C, H, W), got {sources.name} {sources.kind}")
    parts = {s: _split(sources.split(s), k, seed, s) for s in ("train", "val", "test")}
    return DataSplits(name, parts["train"], parts["val"], parts["test"], "image", num_bins=sources.num_bins)


def _loader(name: str, k: int) -> Callable[[DataConfig], DataSplits]:
    def load(config: DataConfig) -> DataSplits:
        return mosaic_splits(mnist_like(config, "mnist"), k, config.data_seed, name)

    load.__doc__ = f"{k}x{k} MNIST mosaics ({28 * k}x{28 * k}, D = {784 * k * k:,})."
    return load


#: Loaders of the mosaic data sets by config name.
MOSAIC_LOADERS: dict[str, Callable[[DataConfig], DataSplits]] = {
    name: _loader(name, k) for name, k in MOSAIC_SIZES.items()
}

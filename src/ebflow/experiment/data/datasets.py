"""The data sets by config name (:data:`LOADERS`) and :func:`load_data`, which loads one and
checks it. The loaders live in ``toys`` (generated 2-D toys and 10-D mm10, ``.npy`` point files),
``image_sets`` (the digits shipped with ebflow, MNIST / Fashion-MNIST / CIFAR-10 from local
files or a torchvision download, generated stand-ins) and ``mosaics`` (k x k grids of MNIST
images, for the scaling study); what they return is ``splits.DataSplits``.

Every loader returns float tensors: images as raw pixel levels ``0 .. num_bins-1`` with shape
``(N, C, H, W)``, points as ``(N, D)``. Data holding NaN or Inf is rejected here, at load time."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ...errors import ConfigError
from ..config.sections import DataConfig
from .image_sets import IMAGE_LOADERS
from .mosaics import MOSAIC_LOADERS
from .splits import DataSplits, check_data
from .toys import POINT_LOADERS

__all__ = ["IMAGE_DATASETS", "LOADERS", "load_data"]

#: The image data sets (pixel levels, dequantisation, logit preprocessing).
IMAGE_DATASETS: tuple[str, ...] = (*IMAGE_LOADERS, *MOSAIC_LOADERS)
#: Data set loaders by config name (``data``): the config's choices are this table's names.
LOADERS: dict[str, Callable[[DataConfig], DataSplits]] = {
    **POINT_LOADERS,
    **IMAGE_LOADERS,
    **MOSAIC_LOADERS,
}


def _check_in_blocks(x: Tensor, what: str, rows: int = 4096) -> None:
    """:func:`check_data` a block of rows at a time (a whole-split finiteness check would take as
    much memory again as a large split: 1.4 GB for 50,000 3x3 mosaics); the whole split when a
    block fails, for check_data's full message."""
    if x.shape[0] == 0 or any(not bool(torch.isfinite(block).all()) for block in x.split(rows)):
        check_data(x, what)


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
        _check_in_blocks(splits.split(split), f"{name} {split} data")
    if splits.kind == "image" and num_bins:
        top = float(max(splits.train.max(), splits.val.max(), splits.test.max()))
        if top > num_bins - 1:
            raise ConfigError(f"config key 'num_bins' is {num_bins} but the {name} pixels reach {top:g}")
    return splits

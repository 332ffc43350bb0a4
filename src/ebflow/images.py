"""Pictures as tensors, with torch only: a batch of images tiled into one grid."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import ConfigError, InputError

__all__ = ["image_grid"]


def image_grid(images: Tensor, nrow: int = 8, *, padding: int = 2, pad_value: float = 0.0) -> Tensor:
    """Tile a batch of images ``(N, C, H, W)`` into one ``(C', H', W')`` picture: ``nrow``
    images per row, row after row, with ``padding`` pixels of ``pad_value`` around and between
    them. Single-channel images become three equal channels (gray as RGB, ready for a colour
    picture), so ``C'`` is 3 when ``C`` is 1 and ``C`` otherwise. The values are copied
    unchanged (pictures usually hold ``[0, 1]``); the grid has the images' dtype and device.

    For ``N > 1`` this is the picture ``torchvision.utils.make_grid`` draws with the same
    arguments; a single image is padded too."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise InputError(f"image_grid needs a batch of images (N, C, H, W), got {got}")
    if images.shape[0] == 0:
        raise InputError("image_grid needs at least one image, got an empty batch")
    for value, what in ((nrow, "nrow"), (padding, "padding")):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if what == "nrow" else 0):
            raise ConfigError(
                f"image_grid: {what} must be an integer >= {1 if what == 'nrow' else 0}, got {value!r}"
            )
    x = images.detach()
    n, c, h, w = x.shape
    if c == 1:
        x = x.expand(n, 3, h, w)
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    cell_h, cell_w = h + padding, w + padding
    grid = torch.full(
        (x.shape[1], rows * cell_h + padding, cols * cell_w + padding),
        float(pad_value),
        dtype=x.dtype,
        device=x.device,
    )
    for k in range(n):
        top = (k // cols) * cell_h + padding
        left = (k % cols) * cell_w + padding
        grid[:, top : top + h, left : left + w] = x[k]
    return grid

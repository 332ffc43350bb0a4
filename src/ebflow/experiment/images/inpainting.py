"""The files of ``ebflow inpaint``: a mask read from a ``FILE.png`` and the grid of an inpainting
written as a picture. The inpainting itself (masks, the MCMC fill, the grid as a tensor) is the
library's :mod:`ebflow.inpainting`, which opens no file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ...errors import ConfigError, InputError
from ...inpainting import MASK_REGIONS, InpaintResult, inpainting_grid, make_mask
from .picture import write_picture

__all__ = ["read_mask_png", "mask_from_spec", "save_inpainting_grid"]


def read_mask_png(path: str | Path, hw: tuple[int, int]) -> Tensor:
    """The white (>= 128 after conversion to gray) pixels of the image ``path``, which must have
    the data's height and width ``hw``: a boolean ``(H, W)`` plane (read by Pillow)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"mask file {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            gray = torch.from_numpy(np.array(img.convert("L"), dtype=np.uint8))
            height, width = gray.shape
    except OSError as err:
        raise InputError(f"cannot read mask image {str(path)!r}: {err}") from err
    if (height, width) != hw:
        raise InputError(
            f"mask image {str(path)!r} is {height}x{width} (HxW) but the data images are {hw[0]}x{hw[1]}"
        )
    plane = gray >= 128
    if not bool(plane.any()):
        raise InputError(f"mask image {str(path)!r} has no white (>= 128) pixel to fill")
    return plane


def mask_from_spec(
    spec: str, event_shape: Sequence[int], *, batch: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    """``ebflow inpaint --mask``: a region or ``random:P`` (:func:`ebflow.inpainting.make_mask`),
    or a ``FILE.png`` whose white pixels are filled (:func:`read_mask_png`)."""
    spec = str(spec)
    if spec.lower().endswith(".png"):
        if len(event_shape) not in (2, 3):
            raise InputError(
                f"mask {spec!r} needs image events (C, H, W) or (H, W); got event shape {tuple(event_shape)}"
            )
        h, w = (int(s) for s in tuple(event_shape)[-2:])
        return make_mask(read_mask_png(spec, (h, w)), event_shape, batch=batch, generator=generator)
    if spec not in MASK_REGIONS and not spec.startswith("random:"):
        raise ConfigError(
            f"unknown mask {spec!r}; use one of {', '.join(MASK_REGIONS)}, random:P or a FILE.png"
        )
    return make_mask(spec, event_shape, batch=batch, generator=generator)


def save_inpainting_grid(
    result: InpaintResult, path: str | Path, *, max_value: float = 255.0, min_size: int = 64
) -> Path:
    """Write the grid of ``result`` (:func:`ebflow.inpainting.inpainting_grid`: rows original /
    masked (noise start) / filled, one column per image) to the picture ``path``, creating its
    folder: a ``.png`` or ``.jpg``."""
    grid = inpainting_grid(result, max_value=max_value, min_size=min_size)
    if not isinstance(path, (str, Path)):
        raise ConfigError(f"path must be a str or pathlib.Path, got {type(path).__name__}")
    return write_picture(path, grid, "inpainting picture")

"""Picture files from tensors: PNG or JPEG, encoded by Pillow, written atomically
(:func:`~ebflow.experiment.rundir.files.write_atomic`)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from ...errors import ConfigError, InputError
from ..rundir.files import write_atomic

__all__ = ["encode_picture", "to_bytes", "write_picture"]

_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # channels -> Pillow image mode


def to_bytes(image: Tensor) -> Tensor:
    """A ``(C, H, W)`` picture with values in ``[0, 1]`` as uint8 ``0..255`` (rounded to nearest)."""
    return image.detach().cpu().float().mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


def encode_picture(pixels: Tensor, fmt: str) -> bytes:
    """The ``fmt`` file (``"PNG"`` or ``"JPEG"``) of a uint8 picture ``(C, H, W)``, ``C`` = 1
    (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA), encoded by Pillow."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[0] not in _MODES:
        raise InputError(
            f"a picture needs uint8 pixels (C, H, W) with C in 1..4, got {pixels.dtype} {tuple(pixels.shape)}"
        )
    c, h, w = pixels.shape
    if h == 0 or w == 0:
        raise InputError(f"a picture needs at least one pixel, got {h}x{w}")
    arr = pixels.permute(1, 2, 0).contiguous().numpy()
    image = Image.fromarray(arr[:, :, 0] if c == 1 else arr)  # mode from the shape: L, LA, RGB, RGBA
    if fmt == "JPEG" and c in (2, 4):
        image = image.convert("RGB" if c == 4 else "L")  # JPEG has no alpha
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def write_picture(path: str | Path, image: Tensor, what: str = "picture") -> Path:
    """Write a ``(C, H, W)`` picture with values in ``[0, 1]`` to ``path`` (``.png``, or
    ``.jpg``/``.jpeg``), atomically; a failed write is an ``OutputError``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg"):
        raise ConfigError(f"cannot write {str(path)!r}: pictures are .png or .jpg files")
    pixels = to_bytes(image)
    data = encode_picture(pixels, "PNG" if suffix == ".png" else "JPEG")
    return write_atomic(path, lambda f: f.write(data), what)

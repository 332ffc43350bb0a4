"""Data shipped with ebflow: the 8x8 handwritten digits (torch and numpy only, no download).

:func:`load_digits` reads ``digits.npz``, a file inside this package: the 1797 images of the
test part of the UCI "Optical Recognition of Handwritten Digits" data set (E. Alpaydin and
C. Kaynak, 1998, https://doi.org/10.24432/C50P49), licensed under Creative Commons
Attribution 4.0 (CC BY 4.0); see the ``NOTICE`` file next to it. They are the images of
scikit-learn's ``load_digits``, in the same order, so the package does not need scikit-learn."""

from __future__ import annotations

import hashlib
import io
from importlib import resources

import numpy as np
import torch
from torch import Tensor

from ..errors import EBFlowError

__all__ = ["DIGITS_BINS", "DIGITS_SHA256", "load_digits"]

#: Pixel levels of the digits: integers 0..16, so 17 bins (``num_bins=17``).
DIGITS_BINS = 17
#: SHA-256 of the images' then the labels' bytes (uint8, C order): checked on every load.
DIGITS_SHA256 = "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"
_FILE = "digits.npz"


def load_digits() -> tuple[Tensor, Tensor]:
    """The 8x8 handwritten digits shipped with ebflow: ``(images, labels)``.

    ``images`` is a float32 tensor ``(1797, 1, 8, 8)`` of integer pixel levels ``0..16`` (each
    pixel counts the ink in a 4x4 block of a 32x32 bitmap), so a model of them uses
    ``num_bins = 17`` (:data:`DIGITS_BINS`), e.g. ``ImagePreprocessing(num_bins=17)``;
    ``labels`` is an int64 tensor ``(1797,)`` of the digits 0..9. Fresh tensors on each call.

    The data are the test part of the UCI "Optical Recognition of Handwritten Digits" set
    (E. Alpaydin and C. Kaynak, 1998, https://doi.org/10.24432/C50P49), under the Creative
    Commons Attribution 4.0 licence (CC BY 4.0): credit them when you publish results on them.
    They are scikit-learn's ``load_digits().images`` and ``.target``, in the same order."""
    try:
        raw = resources.files(__name__).joinpath(_FILE).read_bytes()
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, ValueError, KeyError) as err:
        raise EBFlowError(
            f"the digits file {_FILE!r} shipped with ebflow cannot be read ({err}); reinstall ebflow"
        ) from err
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    if images.shape != (1797, 8, 8) or labels.shape != (1797,) or digest != DIGITS_SHA256:
        raise EBFlowError(
            f"the digits file {_FILE!r} shipped with ebflow is damaged (shape "
            f"{images.shape}, checksum {digest[:12]}...); reinstall ebflow"
        )
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y

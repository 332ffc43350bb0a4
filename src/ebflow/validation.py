"""Input checks shared by models and layers: shape, dtype, device and finiteness."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import InputError

__all__ = ["check_batch", "check_finite"]


def check_finite(x: Tensor, what: str = "input") -> None:
    """Raise :class:`InputError` if ``x`` holds NaN or infinite values."""
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise InputError(f"{what} contains non-finite values ({n_nan} NaN, {n_inf} Inf)")


def check_batch(
    x: object,
    event_shape: Sequence[int],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    what: str = "input",
    finite: bool = True,
) -> Tensor:
    """Check that ``x`` is a floating tensor of shape ``(batch, *event_shape)``.

    Returns ``x`` unchanged; raises :class:`InputError` naming the problem otherwise.
    """
    if not isinstance(x, Tensor):
        raise InputError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    event_shape = tuple(event_shape)
    if not x.is_floating_point():
        raise InputError(f"{what} must have a floating dtype, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise InputError(
            f"{what} has dtype {x.dtype} but the model has dtype {dtype}; "
            f"convert one of them (e.g. x.to({dtype}) or model.to({x.dtype}))"
        )
    if device is not None and x.device.type != device.type:
        raise InputError(f"{what} is on device {x.device} but the model is on {device}")
    if x.dim() != len(event_shape) + 1 or tuple(x.shape[1:]) != event_shape:
        raise InputError(
            f"{what} must have shape (batch, {', '.join(map(str, event_shape))}), "
            f"got {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise InputError(f"{what} is an empty batch")
    if finite:
        check_finite(x, what)
    return x

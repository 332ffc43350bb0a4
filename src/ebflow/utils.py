"""Small tensor helpers shared by the library modules."""

from __future__ import annotations

import warnings
from typing import TypeVar

from torch import Tensor

__all__ = ["grad_ready", "renamed_keyword", "sum_except_batch"]

T = TypeVar("T")


def sum_except_batch(t: Tensor) -> Tensor:
    """Sum over every dimension but the first: ``(batch, ...) -> (batch,)``.

    One helper for the per-example sums of layers, priors and objectives (PyTorch has no public
    equivalent; this replaces four private copies)."""
    return t.reshape(t.shape[0], -1).sum(dim=1)


def grad_ready(h: Tensor) -> Tensor:
    """``h`` itself when it requires grad, else a detached leaf copy that does, so that autograd
    can differentiate with respect to ``h`` even when nothing before it requires grad (e.g. the
    output of a model's linear prefix when no parameter is trained)."""
    return h if h.requires_grad else h.detach().requires_grad_(True)


def renamed_keyword(old_value: T | None, new_value: T, *, old: str, new: str, owner: str) -> T:
    """The value of a keyword renamed from ``old`` to ``new`` (kept one release): ``old_value``,
    with a :class:`DeprecationWarning`, when the caller used the old name, else ``new_value``."""
    if old_value is None:
        return new_value
    warnings.warn(f"{owner}: the keyword {old!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=3)
    return old_value

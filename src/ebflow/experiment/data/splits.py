"""What a data set loader returns (:class:`DataSplits`), the density of smoothed toy points
(:class:`ToyMixture`), the check every loaded split passes (:func:`check_data`) and the error of
a data set that is neither on disk nor downloadable."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import ConfigError, EBFlowError, InputError

__all__ = ["DataSplits", "DataUnavailableError", "ToyMixture", "check_data", "check_pixel_range"]


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


def check_pixel_range(data: Tensor, num_bins: int, what: str) -> None:
    """Pixel levels must lie in ``[0, num_bins - 1]`` (checked once, not per batch)."""
    lo, hi = float(data.min()), float(data.max())
    if lo < 0 or hi > num_bins - 1:
        raise InputError(
            f"{what} pixel values must lie in [0, {num_bins - 1}], got range [{lo}, {hi}]; "
            "check the config key 'num_bins'"
        )

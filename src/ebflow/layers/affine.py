"""Element-wise affine layers with constant Jacobian: ActNorm and a fixed scaling."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from .base import LinearFlowLayer, Shape

__all__ = ["ActNorm", "FixedAffine"]


class ActNorm(LinearFlowLayer):
    r"""Per-channel affine map :math:`y = (x + \beta) e^{s}` with learned :math:`\beta, s`.

    Channels are dimension 1 (features for vectors, channels for images).
    :math:`\log|\det| = (\text{pixels per channel}) \sum_c s_c`. On its first call with a batch
    of at least two examples, :math:`\beta, s` are set so that the output has zero mean and unit
    variance per channel (data-dependent initialisation).
    """

    def __init__(self, channels: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ConfigError(f"ActNorm needs a positive number of channels, got {channels!r}")
        self.channels = channels
        self.eps = eps
        self.shift = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    def _view(self, t: Tensor, ndim: int) -> Tensor:
        return t.view(1, -1, *([1] * (ndim - 2)))

    def output_shape(self, event_shape: Shape) -> Shape:
        if len(event_shape) < 1 or event_shape[0] != self.channels:
            raise InputError(
                f"ActNorm({self.channels}) expects inputs with {self.channels} channels in "
                f"dimension 1, got event shape {tuple(event_shape)}"
            )
        return tuple(event_shape)

    @torch.no_grad()
    def initialize_from(self, x: Tensor) -> None:
        """Set shift and log-scale so that ``transform(x)`` is standardised per channel."""
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        std = x.std(dim=dims)
        self.shift.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def transform(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise InputError(
                f"ActNorm({self.channels}) expects inputs with {self.channels} channels in "
                f"dimension 1, got shape {tuple(x.shape)}"
            )
        if not bool(self.initialized) and x.shape[0] > 1:
            self.initialize_from(x.detach())
        return (x + self._view(self.shift, x.dim())) * self._view(self.log_scale, x.dim()).exp()

    def _log_abs_det(self, event_shape: Shape) -> Tensor:
        return math.prod(event_shape[1:]) * self.log_scale.sum()

    def _factorize(self, event_shape: Shape) -> None:
        return None

    def _inverse_with(self, factors: None, y: Tensor) -> Tensor:
        return y * self._view(-self.log_scale, y.dim()).exp() - self._view(self.shift, y.dim())


class FixedAffine(LinearFlowLayer):
    r"""Fixed element-wise map :math:`y = a x + b` (no parameters); :math:`\log|\det| = D \log|a|`."""

    def __init__(self, scale: float, shift: float = 0.0) -> None:
        super().__init__()
        if not math.isfinite(scale) or scale == 0.0 or not math.isfinite(shift):
            raise ConfigError(f"FixedAffine needs a finite non-zero scale, got scale={scale}, shift={shift}")
        self.scale = float(scale)
        self.shift = float(shift)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, shift={self.shift}"

    def transform(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift

    def _log_abs_det(self, event_shape: Shape) -> Tensor:
        return torch.tensor(math.prod(event_shape) * math.log(abs(self.scale)), dtype=torch.float64)

    def _factorize(self, event_shape: Shape) -> None:
        return None

    def _inverse_with(self, factors: None, y: Tensor) -> Tensor:
        return (y - self.shift) / self.scale

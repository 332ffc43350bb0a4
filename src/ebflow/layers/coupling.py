"""Affine coupling layers (RealNVP / Glow style) with MLP or CNN conditioners."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from ..utils import sum_except_batch
from .base import FlowLayer, Shape
from .silu import SiLU

__all__ = ["AffineCoupling", "mlp_conditioner", "cnn_conditioner"]


def _zero_last(layer: nn.Module) -> nn.Module:
    for p in layer.parameters():
        nn.init.zeros_(p)
    return layer


def mlp_conditioner(
    in_features: int, out_features: int, hidden: int = 64, depth: int = 2,
    activation: Callable[[], nn.Module] = SiLU,
) -> nn.Sequential:
    """An MLP with ``depth`` hidden layers of width ``hidden``; the last layer starts at zero.
    The activation (default: :class:`~ebflow.layers.SiLU`, ``torch.nn.SiLU``'s values with
    closed-form higher derivatives) is any module factory."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), activation()]
        width = hidden
    layers.append(_zero_last(nn.Linear(width, out_features)))
    return nn.Sequential(*layers)


def cnn_conditioner(
    in_channels: int, out_channels: int, hidden: int = 64,
    activation: Callable[[], nn.Module] = SiLU,
) -> nn.Sequential:
    """Conv3x3 -> act -> Conv1x1 -> act -> Conv3x3 (zero-initialised), size-preserving; the
    activation as in :func:`mlp_conditioner`."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1), activation(),
        nn.Conv2d(hidden, hidden, 1), activation(),
        _zero_last(nn.Conv2d(hidden, out_channels, 3, padding=1)),
    )


class AffineCoupling(FlowLayer):
    r"""Affine coupling :math:`y_a = x_a`, :math:`y_b = x_b e^{s(x_a)} + t(x_a)`.

    The event splits along dimension 1 (features of a vector, channels of an image) into
    :math:`x_a` (the first ``split`` entries, or the last ones when ``swap``) and :math:`x_b`.
    The log-scale is bounded, :math:`s = c \tanh(\tilde s / c)` with ``c = scale_bound``;
    :math:`\log|\det| = \sum s`. The conditioner's last layer starts at zero, so the layer starts
    as the identity. ``conditioner`` maps :math:`x_a` to ``2 * |x_b|`` channels.
    """

    def __init__(
        self,
        event_shape: Shape,
        *,
        hidden: int = 64,
        depth: int = 2,
        swap: bool = False,
        scale_bound: float = 2.0,
        conditioner: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        if len(self.event_shape) not in (1, 3):
            raise ConfigError(
                f"AffineCoupling acts on vectors (D,) or images (C, H, W); got {self.event_shape}"
            )
        channels = self.event_shape[0]
        if channels < 2:
            raise ConfigError(f"AffineCoupling needs at least 2 features/channels, got {channels}")
        if not scale_bound > 0:
            raise ConfigError(f"AffineCoupling needs scale_bound > 0, got {scale_bound}")
        self.swap = bool(swap)
        self.scale_bound = float(scale_bound)
        first = channels // 2
        self.sizes = (first, channels - first)
        n_cond, n_out = (self.sizes[1], self.sizes[0]) if self.swap else self.sizes
        if conditioner is None:
            if len(self.event_shape) == 1:
                conditioner = mlp_conditioner(n_cond, 2 * n_out, hidden=hidden, depth=depth)
            else:
                conditioner = cnn_conditioner(n_cond, 2 * n_out, hidden=hidden)
        self.conditioner = conditioner

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, swap={self.swap}, scale_bound={self.scale_bound}"

    def output_shape(self, event_shape: Shape) -> Shape:
        if tuple(event_shape) != self.event_shape:
            raise InputError(
                f"AffineCoupling built for event shape {self.event_shape}, got {tuple(event_shape)}"
            )
        return self.event_shape

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = torch.split(x, self.sizes, dim=1)
        return (b, a) if self.swap else (a, b)

    def _join(self, cond: Tensor, moved: Tensor) -> Tensor:
        return torch.cat((moved, cond) if self.swap else (cond, moved), dim=1)

    def _scale_shift(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        raw_s, t = self.conditioner(cond).chunk(2, dim=1)
        s = self.scale_bound * torch.tanh(raw_s / self.scale_bound)
        return s, t

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check_event_shape(x, self.event_shape, "inputs")
        cond, moved = self._split(x)
        s, t = self._scale_shift(cond)
        y = self._join(cond, moved * torch.exp(s) + t)
        return y, sum_except_batch(s)

    def inverse(self, y: Tensor) -> Tensor:
        self._check_event_shape(y, self.event_shape, "outputs")
        cond, moved = self._split(y)
        s, t = self._scale_shift(cond)
        return self._join(cond, (moved - t) * torch.exp(-s))

"""Affine coupling layers (RealNVP / Glow style) with MLP or CNN conditioners."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from ..utils import sum_except_batch
from .base import Example, FlowLayer, Shape, example_inputs, perturbed
from .silu import SiLU

__all__ = ["AffineCoupling", "CONDITIONER_ACTIVATIONS", "ChannelScale", "mlp_conditioner", "cnn_conditioner"]


def _zero_last(layer: nn.Module) -> nn.Module:
    for p in layer.parameters():
        nn.init.zeros_(p)
    return layer


def mlp_conditioner(
    in_features: int,
    out_features: int,
    hidden: int = 64,
    depth: int = 2,
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


class ChannelScale(nn.Module):
    r"""Learnable per-channel output scale :math:`y_c = x_c\, e^{\kappa s_c}`, :math:`s = 0` at
    init (scale 1), :math:`\kappa` = ``factor``: Glow's zero-initialised last convolution
    ("Conv2dZeros", :math:`\kappa = 3`) is a zero convolution followed by this."""

    def __init__(self, channels: int, factor: float = 3.0) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ConfigError(f"ChannelScale needs a positive number of channels, got {channels!r}")
        if not factor > 0:
            raise ConfigError(f"ChannelScale needs factor > 0, got {factor!r}")
        self.factor = float(factor)
        self.log_scale = nn.Parameter(torch.zeros(channels))

    def extra_repr(self) -> str:
        return f"channels={self.log_scale.numel()}, factor={self.factor}"

    def forward(self, x: Tensor) -> Tensor:
        r""":math:`x_c\, e^{\kappa s_c}` for channels ``c`` in dimension 1."""
        if x.dim() < 2 or x.shape[1] != self.log_scale.numel():
            raise InputError(
                f"ChannelScale({self.log_scale.numel()}) expects channels in dimension 1, "
                f"got shape {tuple(x.shape)}"
            )
        scale = torch.exp(self.factor * self.log_scale)
        return x * scale.view(1, -1, *([1] * (x.dim() - 2)))


#: Conditioner activations by name (module factories): ``leaky_relu`` is ``LeakyReLU(0.1)``.
CONDITIONER_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": SiLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "relu": nn.ReLU,
}


def cnn_conditioner(
    in_channels: int,
    out_channels: int,
    hidden: int = 64,
    activation: Callable[[], nn.Module] = SiLU,
    *,
    output_scale: bool = False,
) -> nn.Sequential:
    """Conv3x3 -> act -> Conv1x1 -> act -> Conv3x3 (zero-initialised), size-preserving; the
    activation as in :func:`mlp_conditioner`. ``output_scale`` appends a :class:`ChannelScale`
    (factor 3) after the last convolution, as in Glow's and the paper's reference Glow."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, hidden, 3, padding=1),
        activation(),
        nn.Conv2d(hidden, hidden, 1),
        activation(),
        _zero_last(nn.Conv2d(hidden, out_channels, 3, padding=1)),
    ]
    if output_scale:
        layers.append(ChannelScale(out_channels))
    return nn.Sequential(*layers)


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

    @classmethod
    def examples(cls) -> list[Example]:
        with torch.random.fork_rng(devices=[]):  # fixed weights, the caller's RNG untouched
            torch.manual_seed(0)
            glow_like = cnn_conditioner(
                2, 4, hidden=6, activation=CONDITIONER_ACTIVATIONS["leaky_relu"], output_scale=True
            )
            return [
                (perturbed(cls((4,), hidden=8)), example_inputs(5, 4)),
                (perturbed(cls((3, 2, 2), hidden=4, swap=True)), example_inputs(5, 3, 2, 2)),
                (perturbed(cls((4, 2, 2), conditioner=glow_like)), example_inputs(5, 4, 2, 2)),
            ]

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, swap={self.swap}, scale_bound={self.scale_bound}"

    def output_shape(self, event_shape: Shape) -> Shape:
        if tuple(event_shape) != self.event_shape:
            raise InputError(
                f"AffineCoupling built for event shape {self.event_shape}, got {tuple(event_shape)}"
            )
        return self.event_shape

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = torch.split(x, list(self.sizes), dim=1)
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

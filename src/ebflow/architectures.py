"""Builders for the model families of the paper's experiments (DESIGN.md §4)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .errors import ConfigError
from .flow import EBFlow
from .layers import (
    ActNorm,
    AffineCoupling,
    Conv1x1,
    Conv2d,
    Dense,
    Flatten,
    FlowLayer,
    Reshape,
    ResidualSmoothLeakyReLU,
    SmoothLeakyReLU,
    Squeeze,
)

__all__ = ["coupling_flow", "dense_flow", "conv_flow", "glow_flow"]


def coupling_flow(
    dim: int = 2, *, blocks: int = 10, hidden: int = 64, depth: int = 2, scale_bound: float = 2.0
) -> EBFlow:
    """``blocks`` x [dense D x D, affine coupling (MLP), ActNorm] + a final dense layer (toy2d)."""
    layers: list[FlowLayer] = []
    for i in range(blocks):
        layers += [
            Dense(dim),
            AffineCoupling((dim,), hidden=hidden, depth=depth, swap=bool(i % 2), scale_bound=scale_bound),
            ActNorm(dim),
        ]
    layers.append(Dense(dim))
    return EBFlow(layers, (dim,))


def dense_flow(
    event_shape: Sequence[int],
    *,
    num_layers: int = 2,
    alpha: float = 0.3,
    parameterisation: str = "full",
    actnorm: bool = False,
    bias: bool = True,
    init: str | None = None,
) -> EBFlow:
    """Fully connected EBFlow: [dense, smooth leaky ReLU (, ActNorm)] x (n-1), dense.

    Image events are flattened first. ``num_layers=2``, ``alpha=0.3`` is the paper's FC model.
    ``init`` is passed to :class:`Dense` (``"identity"`` skips the orthogonal draw, e.g. when the
    weights are loaded from a checkpoint right after).
    """
    if num_layers < 1:
        raise ConfigError(f"num_layers must be >= 1, got {num_layers}")
    event_shape = tuple(event_shape)
    d = math.prod(event_shape)
    layers: list[FlowLayer] = [] if len(event_shape) == 1 else [Flatten(event_shape)]
    for i in range(num_layers):
        layers.append(Dense(d, parameterisation=parameterisation, bias=bias, init=init))
        if i < num_layers - 1:
            layers.append(SmoothLeakyReLU(alpha))
            if actnorm:
                layers.append(ActNorm(d))
    if len(event_shape) != 1:
        layers.append(Reshape((d,), event_shape))
    return EBFlow(layers, event_shape)


def conv_flow(
    event_shape: Sequence[int],
    *,
    blocks: int = 3,
    convs_per_block: int = 2,
    kernel_size: int = 7,
    alpha: float = 0.3,
) -> EBFlow:
    """Convolutional EBFlow: ``blocks`` blocks of ``convs_per_block`` C->C convolutions with a
    residual smooth leaky ReLU between convolutions, and a squeeze between blocks."""
    c, h, w = event_shape
    layers: list[FlowLayer] = []
    for b in range(blocks):
        if b > 0:
            layers.append(Squeeze())
            c, h, w = 4 * c, h // 2, w // 2
        for i in range(convs_per_block):
            layers.append(Conv2d(c, kernel_size))
            if not (b == blocks - 1 and i == convs_per_block - 1):
                layers.append(ResidualSmoothLeakyReLU(alpha))
    return EBFlow(layers, tuple(event_shape))


def glow_flow(
    event_shape: Sequence[int], *, levels: int = 2, steps: int = 16, hidden: int = 64
) -> EBFlow:
    """Glow-style flow: per level a squeeze and ``steps`` x [ActNorm, 1x1 conv, affine coupling]."""
    c, h, w = event_shape
    layers: list[FlowLayer] = []
    for _ in range(levels):
        layers.append(Squeeze())
        c, h, w = 4 * c, h // 2, w // 2
        for s in range(steps):
            layers += [
                ActNorm(c),
                Conv1x1(c),
                AffineCoupling((c, h, w), hidden=hidden, swap=bool(s % 2)),
            ]
    return EBFlow(layers, tuple(event_shape))

"""Builders for the model families of the paper's experiments (DESIGN.md §4)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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
    on_first_part,
)
from .utils import renamed_keyword

__all__ = ["coupling_flow", "dense_flow", "conv_flow", "glow_flow"]


def coupling_flow(
    dim: int = 2, *, blocks: int = 10, hidden: int = 64, depth: int = 2, scale_bound: float = 2.0
) -> EBFlow:
    """``blocks`` x [dense D x D, affine coupling (MLP), ActNorm] + a final dense layer (toy2d).
    Call :meth:`EBFlow.initialize` with a batch of data before use (ActNorm)."""
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
    parameterization: str = "full",
    actnorm: bool = False,
    bias: bool = True,
    init: str | None = None,
    parameterisation: str | None = None,
) -> EBFlow:
    """Fully connected EBFlow: [dense, smooth leaky ReLU (, ActNorm)] x (n-1), dense.

    Image events are flattened first. ``num_layers=2``, ``alpha=0.3`` is the paper's FC model.
    ``parameterization`` and ``init`` are passed to :class:`Dense` (``"identity"`` skips the
    orthogonal draw, e.g. when the weights are loaded from a checkpoint right after);
    ``parameterisation`` is a deprecated alias (one release). With ``actnorm``, call
    :meth:`EBFlow.initialize` with a batch of data before use.
    """
    parameterization = renamed_keyword(parameterisation, parameterization, old="parameterisation",
                                       new="parameterization", owner="dense_flow")
    if num_layers < 1:
        raise ConfigError(f"num_layers must be >= 1, got {num_layers}")
    event_shape = tuple(event_shape)
    d = math.prod(event_shape)
    layers: list[FlowLayer] = [] if len(event_shape) == 1 else [Flatten(event_shape)]
    for i in range(num_layers):
        layers.append(Dense(d, parameterization=parameterization, bias=bias, init=init))
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
    init: str = "identity",
    spectral_norm: bool = False,
    conv: Callable[[tuple[int, int, int], int], FlowLayer] | None = None,
) -> EBFlow:
    """Convolutional EBFlow: ``blocks`` blocks of ``convs_per_block`` C->C convolutions with a
    residual smooth leaky ReLU between convolutions, and a squeeze between blocks. ``init`` and
    ``spectral_norm`` (the reference's CIFAR-CNN recipe for ML, SSM and DSM; see
    :class:`Conv2d`: evaluate in eval mode) are passed to every :class:`Conv2d`; ``conv``, a
    function ``(event_shape (C, H, W), kernel_size) -> layer``, replaces :class:`Conv2d` (e.g. a
    :class:`~ebflow.layers.CircularConv2d`)."""
    c, h, w = event_shape
    layers: list[FlowLayer] = []
    for b in range(blocks):
        if b > 0:
            layers.append(Squeeze())
            c, h, w = 4 * c, h // 2, w // 2
        for i in range(convs_per_block):
            layers.append(conv((c, h, w), kernel_size) if conv is not None
                          else Conv2d(c, kernel_size, init=init, spectral_norm=spectral_norm))
            if not (b == blocks - 1 and i == convs_per_block - 1):
                layers.append(ResidualSmoothLeakyReLU(alpha))
    return EBFlow(layers, tuple(event_shape))


def glow_flow(
    event_shape: Sequence[int], *, levels: int = 2, steps: int = 16, hidden: int = 64,
    split_prior: bool = True,
) -> EBFlow:
    r"""Glow-style multi-scale flow: per level a squeeze and ``steps`` x [ActNorm, 1x1 conv,
    affine coupling]. With ``split_prior``, every level but the last ends with a split prior --
    an affine coupling that Gaussianises the second half of the channels given the first, i.e.
    :math:`z_b \sim N(\mu(z_a), \sigma(z_a)^2)` -- and the later levels act on the first half
    only (the event is flattened there; the latent is a vector). Call :meth:`EBFlow.initialize`
    with a batch of data before use (ActNorm)."""
    c, h, w = event_shape
    total = c * h * w
    layers: list[FlowLayer] = []
    part: tuple[int, int, int] | None = None  # shape of the part still transformed, once flat

    def add(layer: FlowLayer, shape_in: tuple[int, int, int]) -> None:
        layers.append(layer if part is None else on_first_part(layer, shape_in, total))

    for level in range(levels):
        squeeze = Squeeze()
        add(squeeze, (c, h, w))
        c, h, w = 4 * c, h // 2, w // 2
        for s in range(steps):
            for layer in (ActNorm(c), Conv1x1(c), AffineCoupling((c, h, w), hidden=hidden, swap=bool(s % 2))):
                add(layer, (c, h, w))
        if split_prior and level < levels - 1:
            if c < 2:
                raise ConfigError(f"cannot split {c} channel(s) at level {level + 1}")
            add(AffineCoupling((c, h, w), hidden=hidden, swap=False), (c, h, w))
            if part is None:
                layers.append(Flatten((c, h, w)))
            c = c // 2  # the first half goes on; the second half is factored out
            part = (c, h, w)
    return EBFlow(layers, tuple(event_shape))

"""Builders for the model families of the paper's experiments (DESIGN.md §4)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import nn

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
    ShiftScaleCoupling,
    SmoothLeakyReLU,
    Squeeze,
    on_first_part,
)
from .layers.coupling import CONDITIONER_ACTIVATIONS, cnn_conditioner
from .layers.dense import PARAMETERIZATIONS, DenseInit, Parameterization

__all__ = [
    "coupling_flow",
    "dense_flow",
    "conv_flow",
    "glow_flow",
    "CONDITIONERS",
    "DENSE_FLOW_PARAMETERIZATIONS",
]

#: Coupling conditioners of :func:`coupling_flow`.
CONDITIONERS: tuple[str, ...] = ("joint", "separate")
#: The ``parameterization`` values of :func:`dense_flow`: :class:`Dense`'s, and
#: ``"triangular_pair"`` (a lower- then an upper-triangular layer).
DENSE_FLOW_PARAMETERIZATIONS: tuple[str, ...] = (*PARAMETERIZATIONS, "triangular_pair")


def coupling_flow(
    dim: int = 2,
    *,
    blocks: int = 10,
    hidden: int = 64,
    depth: int = 2,
    scale_bound: float = 2.0,
    conditioner: str = "joint",
    shift_activation: str = "swish",
    weight_norm: bool = False,
    actnorm_scale: str = "log",
    prior: nn.Module | None = None,
) -> EBFlow:
    """``blocks`` x [dense D x D, affine coupling (MLP), ActNorm] + a final dense layer (toy2d).
    Call :meth:`EBFlow.initialize` with a batch of data before use (ActNorm).

    ``conditioner="joint"``: :class:`AffineCoupling`, one MLP of ``depth`` hidden layers giving
    a tanh-bounded log-scale and the shift. ``"separate"``: the reference code's toy model,
    :class:`ShiftScaleCoupling` (separate scale and shift networks, ``y_b = (x_b - t) e^{-s}``,
    learnable-beta Swish, the shift network's activation ``shift_activation``, orthogonal
    weights) and dense layers initialised as ``torch.nn.Linear`` there (orthogonal weight,
    bias ``U(-1/sqrt(D), 1/sqrt(D))``). ``weight_norm`` reparameterises every dense weight as
    ``W = g V / ||V||`` per row. ``actnorm_scale``: ActNorm learns its log-scale (``"log"``) or
    its scale (``"linear"``, the reference's toy model). ``prior``: the latent distribution
    (default standard normal)."""
    if conditioner not in CONDITIONERS:
        raise ConfigError(f"unknown coupling conditioner {conditioner!r}; choose {' or '.join(CONDITIONERS)}")

    def dense() -> Dense:
        layer = Dense(dim)
        if conditioner == "separate" and layer.bias is not None:  # Dense(dim) has a bias
            bound = 1 / math.sqrt(dim)
            nn.init.uniform_(layer.bias, -bound, bound)
        if weight_norm:
            nn.utils.parametrizations.weight_norm(layer, "weight", dim=0)
        return layer

    layers: list[FlowLayer] = []
    for i in range(blocks):
        if conditioner == "separate":
            coupling: FlowLayer = ShiftScaleCoupling(
                dim,
                condition_on_odd=i % 2 == 0,
                hidden=hidden,
                depth=depth,
                shift_activation=shift_activation,
            )
        else:
            coupling = AffineCoupling(
                (dim,), hidden=hidden, depth=depth, swap=bool(i % 2), scale_bound=scale_bound
            )
        layers += [dense(), coupling, ActNorm(dim, scale=actnorm_scale)]
    layers.append(dense())
    return EBFlow(layers, (dim,), prior)


def dense_flow(
    event_shape: Sequence[int],
    *,
    num_layers: int = 2,
    alpha: float = 0.3,
    parameterization: str = "full",
    actnorm: bool = False,
    bias: bool = True,
    init: str | None = None,
    prior: nn.Module | None = None,
) -> EBFlow:
    """Fully connected EBFlow: [dense, smooth leaky ReLU (, ActNorm)] x (n-1), dense.

    Image events are flattened first. ``num_layers=2``, ``alpha=0.3`` is the paper's FC model.
    ``parameterization`` and ``init`` are passed to :class:`Dense` (``"identity"`` skips the
    orthogonal draw, e.g. when the weights are loaded from a checkpoint right after).
    With ``actnorm``, call
    :meth:`EBFlow.initialize` with a batch of data before use.

    ``parameterization="triangular_pair"`` (the reference code's ``trilu``): each dense layer is
    two, a lower-triangular one (initialised by ``init``) then an upper-triangular one starting
    at all ones, both with free diagonals (``W = U L``). ``prior``: the latent distribution
    (default standard normal).

    Example:
        >>> import torch, ebflow
        >>> model = ebflow.dense_flow((1, 8, 8), num_layers=2)
        >>> [type(layer).__name__ for layer in model.layers]
        ['Flatten', 'Dense', 'SmoothLeakyReLU', 'Dense', 'Reshape']
        >>> model.log_prob(torch.randn(5, 1, 8, 8)).shape
        torch.Size([5])
    """
    if parameterization not in DENSE_FLOW_PARAMETERIZATIONS:
        raise ConfigError(
            f"unknown dense parameterization {parameterization!r}; "
            f"choose one of {', '.join(DENSE_FLOW_PARAMETERIZATIONS)}"
        )
    if num_layers < 1:
        raise ConfigError(f"num_layers must be >= 1, got {num_layers}")
    event_shape = tuple(event_shape)
    d = math.prod(event_shape)
    dense_init = cast("DenseInit | None", init)  # Dense checks it
    layers: list[FlowLayer] = [] if len(event_shape) == 1 else [Flatten(event_shape)]
    for i in range(num_layers):
        if parameterization == "triangular_pair":
            layers += _triangular_pair(d, bias=bias, init=dense_init)
        else:
            kind = cast(Parameterization, parameterization)  # checked above
            layers.append(Dense(d, parameterization=kind, bias=bias, init=dense_init))
        if i < num_layers - 1:
            layers.append(SmoothLeakyReLU(alpha))
            if actnorm:
                layers.append(ActNorm(d))
    if len(event_shape) != 1:
        layers.append(Reshape((d,), event_shape))
    return EBFlow(layers, event_shape, prior)


def _triangular_pair(d: int, *, bias: bool, init: DenseInit | None) -> list[FlowLayer]:
    """``x -> U (L x)``: lower-triangular ``L`` (``init``), upper-triangular ``U`` = all ones
    at the start (the reference's ``x @ U_ref @ L_ref`` in the ``W x`` convention)."""
    lower = Dense(d, parameterization="tril", bias=bias, init=init)
    upper = Dense(d, parameterization="triu", bias=bias, init="identity")
    with torch.no_grad():
        upper.weight.copy_(torch.triu(torch.ones(d, d)))
    return [lower, upper]


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
            layers.append(
                conv((c, h, w), kernel_size)
                if conv is not None
                else Conv2d(c, kernel_size, init=init, spectral_norm=spectral_norm)
            )
            if not (b == blocks - 1 and i == convs_per_block - 1):
                layers.append(ResidualSmoothLeakyReLU(alpha))
    return EBFlow(layers, tuple(event_shape))


def _conditioner_activation(name: str) -> Callable[[], nn.Module]:
    """The activation factory of a name of :data:`~ebflow.layers.CONDITIONER_ACTIVATIONS`."""
    if name not in CONDITIONER_ACTIVATIONS:
        raise ConfigError(
            f"unknown conditioner activation {name!r}; choose one of {', '.join(CONDITIONER_ACTIVATIONS)}"
        )
    return CONDITIONER_ACTIVATIONS[name]


def _glow_coupling(
    shape: tuple[int, int, int],
    *,
    hidden: int,
    activation: str,
    output_scale: bool,
    swap: bool,
) -> AffineCoupling:
    """An affine coupling on ``(C, H, W)`` whose CNN conditioner maps the conditioning half
    (the first ``C // 2`` channels, the last ones when ``swap``) to a log-scale and a shift."""
    c = shape[0]
    n_cond = c - c // 2 if swap else c // 2
    conditioner = cnn_conditioner(
        n_cond, 2 * (c - n_cond), hidden, _conditioner_activation(activation), output_scale=output_scale
    )
    return AffineCoupling(shape, swap=swap, conditioner=conditioner)


def glow_flow(
    event_shape: Sequence[int],
    *,
    levels: int = 2,
    steps: int = 16,
    hidden: int = 64,
    split_prior: bool = True,
    activation: str = "silu",
    split_activation: str | None = None,
    output_scale: bool = False,
    alternate: bool = True,
    train_actnorm: bool = True,
) -> EBFlow:
    r"""Glow-style multi-scale flow: per level a squeeze and ``steps`` x [ActNorm, 1x1 conv,
    affine coupling]. With ``split_prior``, every level but the last ends with a split prior --
    an affine coupling that Gaussianises the second half of the channels given the first, i.e.
    :math:`z_b \sim N(\mu(z_a), \sigma(z_a)^2)` -- and the later levels act on the first half
    only (the event is flattened there; the latent is a vector). Call :meth:`EBFlow.initialize`
    with a batch of data before use (ActNorm).

    Couplings: :math:`y_b = x_b e^{s} + t`, :math:`s = 2\tanh(\tilde s / 2)`, with conditioners
    Conv3x3 -> act -> Conv1x1 -> act -> zero Conv3x3 of width ``hidden``. ``activation``: a name
    of :data:`~ebflow.layers.CONDITIONER_ACTIVATIONS` (``split_activation``, default the same,
    for the split priors'); ``output_scale``: a learnable per-channel scale :math:`e^{3 s_c}`
    after the last convolution (:class:`~ebflow.layers.ChannelScale`); ``alternate``: swap the
    conditioning half at every other step (False: always the first half); ``train_actnorm=False``
    freezes ActNorm after its data-dependent initialisation. The paper's reference Glow is
    ``hidden=512, activation="leaky_relu", split_activation="relu", output_scale=True,
    alternate=False, train_actnorm=False``.
    """
    c, h, w = event_shape
    total = c * h * w
    split_activation = activation if split_activation is None else split_activation
    for name in (activation, split_activation):
        _conditioner_activation(name)  # a bad name fails before any layer is built
    layers: list[FlowLayer] = []
    part: tuple[int, int, int] | None = None  # shape of the part still transformed, once flat

    def add(layer: FlowLayer, shape_in: tuple[int, int, int]) -> None:
        layers.append(layer if part is None else on_first_part(layer, shape_in, total))

    for level in range(levels):
        squeeze = Squeeze()
        add(squeeze, (c, h, w))
        c, h, w = 4 * c, h // 2, w // 2
        for s in range(steps):
            actnorm, conv = ActNorm(c).requires_grad_(train_actnorm), Conv1x1(c)
            coupling = _glow_coupling(
                (c, h, w),
                hidden=hidden,
                activation=activation,
                output_scale=output_scale,
                swap=alternate and bool(s % 2),
            )
            for layer in (actnorm, conv, coupling):
                add(layer, (c, h, w))
        if split_prior and level < levels - 1:
            if c < 2:
                raise ConfigError(f"cannot split {c} channel(s) at level {level + 1}")
            add(
                _glow_coupling(
                    (c, h, w),
                    hidden=hidden,
                    activation=split_activation,
                    output_scale=output_scale,
                    swap=False,
                ),
                (c, h, w),
            )
            if part is None:
                layers.append(Flatten((c, h, w)))
            c = c // 2  # the first half goes on; the second half is factored out
            part = (c, h, w)
    return EBFlow(layers, tuple(event_shape))

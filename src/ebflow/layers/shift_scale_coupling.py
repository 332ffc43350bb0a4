r"""The reference code's toy coupling layer: separate scale and shift networks and
:math:`y_b = (x_b - t(x_a))\,e^{-s(x_a)}`, with an unbounded log-scale.

The coordinates alternate by parity (as the reference's mask ``arange(D) % 2``): the layer
conditions on the odd coordinates (or on the even ones) and transforms the others.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from .base import Example, FlowLayer, Shape, example_inputs, perturbed
from .swish import LearnableSwish

__all__ = ["ShiftScaleCoupling", "separate_conditioners", "SHIFT_ACTIVATIONS"]

#: Activations of the shift network (the scale network always uses a learnable Swish).
SHIFT_ACTIVATIONS: tuple[str, ...] = ("swish", "elu")


def _full_mlp(features: int, hidden: int, depth: int) -> nn.Sequential:
    """``Linear(D, h)``, then ``depth`` x [learnable Swish, Linear] ending in ``Linear(h, D)``."""
    layers: list[nn.Module] = [nn.Linear(features, hidden)]
    for _ in range(depth - 1):
        layers += [LearnableSwish(hidden), nn.Linear(hidden, hidden)]
    layers += [LearnableSwish(hidden), nn.Linear(hidden, features)]
    return nn.Sequential(*layers)


def _sliced(layer: nn.Linear, rows: Tensor | None, cols: Tensor | None) -> nn.Linear:
    """A copy of ``layer`` restricted to some output rows / input columns."""
    w, b = layer.weight.detach(), layer.bias.detach()
    if rows is not None:
        w, b = w[rows], b[rows]
    if cols is not None:
        w = w[:, cols]
    out = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        out.weight.copy_(w)
        out.bias.copy_(b)
    return out


def separate_conditioners(
    features: int,
    cond: Tensor,
    moved: Tensor,
    *,
    hidden: int = 64,
    depth: int = 3,
    shift_activation: str = "swish",
) -> tuple[nn.Sequential, nn.Sequential]:
    """The scale and shift networks of the reference's toy coupling, ``depth`` hidden layers of
    ``hidden`` each. As there: the shift network starts as a copy of the scale network (same
    biases), its activations become ELU when ``shift_activation="elu"``, and every weight of
    both is then drawn orthogonal (biases keep PyTorch's default, fan-in ``D``). The reference
    feeds the masked ``D``-vector and keeps the transformed outputs; here the first layer keeps
    the columns of the conditioning coordinates and the last the rows of the transformed ones
    (the same function: the other weights never receive a gradient)."""
    if shift_activation not in SHIFT_ACTIVATIONS:
        raise ConfigError(
            f"unknown shift activation {shift_activation!r}; choose {' or '.join(SHIFT_ACTIVATIONS)}"
        )
    if not isinstance(depth, int) or depth < 1 or not isinstance(hidden, int) or hidden < 1:
        raise ConfigError(f"conditioners need depth >= 1 and hidden >= 1, got {depth}, {hidden}")
    scale = _full_mlp(features, hidden, depth)
    shift = copy.deepcopy(scale)
    if shift_activation == "elu":
        for i, m in enumerate(shift):
            if isinstance(m, LearnableSwish):
                shift[i] = nn.ELU()
    out = []
    for net in (scale, shift):
        for m in net:
            if isinstance(m, nn.Linear):
                nn.init.orthogonal_(m.weight)
        first, last = net[0], net[-1]
        assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)  # _full_mlp's ends
        net[0] = _sliced(first, None, cond)
        net[-1] = _sliced(last, moved, None)
        out.append(net)
    return out[0], out[1]


class ShiftScaleCoupling(FlowLayer):
    r"""Coupling :math:`y_a = x_a`, :math:`y_b = (x_b - t(x_a))\,e^{-s(x_a)}`,
    :math:`\log|\det| = -\sum s(x_a)`, on vectors ``(batch, D)``.

    :math:`x_a` are the odd coordinates when ``condition_on_odd`` (the reference's first block),
    else the even ones. ``scale_net`` and ``shift_net`` map :math:`x_a` to :math:`|x_b|` values
    (default: :func:`separate_conditioners` with ``hidden``, ``depth``, ``shift_activation``).
    """

    cond: Tensor  # buffers: the conditioning and the transformed coordinates,
    moved: Tensor
    order: Tensor  # and the permutation that puts [x_a, y_b] back in place

    def __init__(
        self,
        features: int,
        *,
        condition_on_odd: bool = True,
        hidden: int = 64,
        depth: int = 3,
        shift_activation: str = "swish",
        scale_net: nn.Module | None = None,
        shift_net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(features, int) or features < 2:
            raise ConfigError(f"ShiftScaleCoupling needs at least 2 features, got {features!r}")
        self.features = features
        self.condition_on_odd = bool(condition_on_odd)
        idx = torch.arange(features)
        is_cond = (idx % 2 == 1) if self.condition_on_odd else (idx % 2 == 0)
        cond, moved = idx[is_cond], idx[~is_cond]
        self.register_buffer("cond", cond, persistent=False)
        self.register_buffer("moved", moved, persistent=False)
        self.register_buffer("order", torch.argsort(torch.cat([cond, moved])), persistent=False)
        if (scale_net is None) != (shift_net is None):
            raise ConfigError("pass both scale_net and shift_net, or neither")
        if scale_net is None or shift_net is None:  # both (checked above)
            scale_net, shift_net = separate_conditioners(
                features, cond, moved, hidden=hidden, depth=depth, shift_activation=shift_activation
            )
        self.scale_net, self.shift_net = scale_net, shift_net

    @classmethod
    def examples(cls) -> list[Example]:
        with torch.random.fork_rng(devices=[]):  # fixed weights, the caller's RNG untouched
            torch.manual_seed(0)
            return [
                (perturbed(cls(2, hidden=8, depth=3)), example_inputs(5, 2)),
                (
                    perturbed(cls(5, condition_on_odd=False, hidden=6, depth=2, shift_activation="elu")),
                    example_inputs(5, 5),
                ),
            ]

    def extra_repr(self) -> str:
        return f"features={self.features}, condition_on_odd={self.condition_on_odd}"

    def output_shape(self, event_shape: Shape) -> Shape:
        if tuple(event_shape) != (self.features,):
            raise InputError(
                f"ShiftScaleCoupling({self.features}) expects inputs of shape "
                f"(batch, {self.features}), got event shape {tuple(event_shape)}"
            )
        return (self.features,)

    def _parts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        xa, xb = x[:, self.cond], x[:, self.moved]
        return xa, xb, self.scale_net(xa), self.shift_net(xa)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check_event_shape(x, (self.features,), "inputs")
        xa, xb, s, t = self._parts(x)
        y = torch.cat([xa, (xb - t) * torch.exp(-s)], dim=1)[:, self.order]
        return y, -s.sum(dim=1)

    def inverse(self, y: Tensor) -> Tensor:
        self._check_event_shape(y, (self.features,), "outputs")
        ya, yb, s, t = self._parts(y)
        return torch.cat([ya, yb * torch.exp(s) + t], dim=1)[:, self.order]

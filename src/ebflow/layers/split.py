"""Multi-scale flows: later layers act on the part of the latent that was not factored out.

After a split prior (an affine coupling that Gaussianises half of the channels given the other
half), the factored-out half goes straight to the latent. :func:`on_first_part` wraps a layer so
that it acts on the first ``prod(part_shape)`` entries of a flat event only (reshaped to
``part_shape``) and passes the rest through: ``(x_a, x_b) -> (f(x_a), x_b)``, with
``log|det| = log|det f|``. A wrapped linear layer stays linear, so its log-determinant still
goes to ``log Z`` and never into the energy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from .base import FlowLayer, LinearFlowLayer, Shape

__all__ = ["on_first_part"]


class _FirstPart:
    """Shared slicing logic of the two wrappers."""

    layer: FlowLayer
    part_shape: Shape
    out_part_shape: Shape
    total: int

    def _setup(self, layer: FlowLayer, part_shape: Sequence[int], total: int) -> None:
        self.layer = layer
        self.part_shape = tuple(int(s) for s in part_shape)
        self.total = int(total)
        self.size = math.prod(self.part_shape)
        if self.size > self.total:
            raise ConfigError(f"part of {self.size} entries does not fit in an event of {self.total}")
        self.out_part_shape = tuple(layer.output_shape(self.part_shape))
        if math.prod(self.out_part_shape) != self.size:
            raise ConfigError(f"{type(layer).__name__} changes the size of its part; it cannot be wrapped")

    def extra_repr(self) -> str:
        return f"part_shape={self.part_shape}, of {self.total}"

    def output_shape(self, event_shape: Shape) -> Shape:
        if tuple(event_shape) != (self.total,):
            raise InputError(
                f"expects flat events of {self.total} entries, got event shape {tuple(event_shape)}"
            )
        return (self.total,)

    def _split(self, x: Tensor, shape: Shape) -> tuple[Tensor, Tensor]:
        if x.dim() != 2 or x.shape[1] != self.total:
            raise InputError(f"expects inputs of shape (batch, {self.total}), got {tuple(x.shape)}")
        return x[:, : self.size].reshape(x.shape[0], *shape), x[:, self.size :]

    @staticmethod
    def _join(part: Tensor, rest: Tensor) -> Tensor:
        return torch.cat([part.reshape(part.shape[0], -1), rest], dim=1)

    def initialize(self, x: Tensor) -> None:
        """The wrapped layer's data-dependent initialisation, from its part of ``x``."""
        part, _ = self._split(x, self.part_shape)
        self.layer.initialize(part)

    @property
    def requires_initialization(self) -> bool:
        return self.layer.requires_initialization


class _LinearOnFirstPart(_FirstPart, LinearFlowLayer):
    layer: LinearFlowLayer

    def __init__(self, layer: LinearFlowLayer, part_shape: Sequence[int], total: int) -> None:
        LinearFlowLayer.__init__(self)
        self._setup(layer, part_shape, total)

    def transform(self, x: Tensor) -> Tensor:
        part, rest = self._split(x, self.part_shape)
        return self._join(self.layer.transform(part), rest)

    def log_abs_det(self, event_shape: Shape) -> Tensor:  # the wrapped layer caches it
        return self.layer.log_abs_det(self.part_shape)

    def inverse(self, y: Tensor) -> Tensor:
        part, rest = self._split(y, self.out_part_shape)
        return self._join(self.layer.inverse(part), rest)


class _NonlinearOnFirstPart(_FirstPart, FlowLayer):
    def __init__(self, layer: FlowLayer, part_shape: Sequence[int], total: int) -> None:
        FlowLayer.__init__(self)
        self._setup(layer, part_shape, total)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        part, rest = self._split(x, self.part_shape)
        y, logdet = self.layer(part)
        return self._join(y, rest), logdet

    def inverse(self, y: Tensor) -> Tensor:
        part, rest = self._split(y, self.out_part_shape)
        return self._join(self.layer.inverse(part), rest)


def on_first_part(layer: FlowLayer, part_shape: Sequence[int], total: int) -> FlowLayer:
    """``layer`` acting on the first ``prod(part_shape)`` entries of flat events of ``total``
    entries (reshaped to ``part_shape``); the other entries pass through unchanged."""
    if isinstance(layer, LinearFlowLayer):
        return _LinearOnFirstPart(layer, part_shape, total)
    return _NonlinearOnFirstPart(layer, part_shape, total)

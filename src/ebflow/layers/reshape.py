"""Volume-preserving rearrangements: squeeze / unsqueeze, flatten and reshape (log|det| = 0)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import InputError
from .base import Example, LinearFlowLayer, Shape, example_inputs

__all__ = ["Squeeze", "Unsqueeze", "Flatten", "Reshape"]


class _Permutation(LinearFlowLayer):
    """A rearrangement of the entries: constant Jacobian with ``log|det| = 0``.

    Cost: ``transform`` and inverse :math:`O(B D)` (a copy at most); ``log|det|`` :math:`O(1)`."""

    def _log_abs_det(self, event_shape: Shape) -> Tensor:
        return torch.zeros((), dtype=torch.float64)

    def _finite_log_abs_det(self, value: Tensor) -> Tensor:
        return value  # exactly 0: nothing to check (and no device read)

    def _factorize(self, event_shape: Shape) -> None:
        return None

    def _inverse_with(self, factors: None, y: Tensor) -> Tensor:
        return self._undo(y)

    def _undo(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _check_image(x_shape: Sequence[int], owner: str) -> None:
    if len(x_shape) != 3:
        raise InputError(
            f"{owner} expects images of shape (batch, C, H, W), got event shape {tuple(x_shape)}"
        )


class Squeeze(_Permutation):
    """Space-to-depth: ``(C, H, W) -> (4C, H/2, W/2)``, each 2x2 patch becomes 4 channels."""

    @classmethod
    def examples(cls) -> list[Example]:
        return [(cls(), example_inputs(3, 2, 4, 4))]

    def output_shape(self, event_shape: Shape) -> Shape:
        _check_image(event_shape, "Squeeze")
        c, h, w = event_shape
        if h % 2 or w % 2:
            raise InputError(f"Squeeze needs an even height and width, got {h}x{w}")
        return (4 * c, h // 2, w // 2)

    def input_shape_of(self, output_event_shape: Shape) -> Shape:
        c, h, w = output_event_shape
        return (c // 4, 2 * h, 2 * w)

    def transform(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        c, h, w = self.output_shape(tuple(x.shape[1:]))
        x = x.reshape(b, c // 4, h, 2, w, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, c, h, w)

    def _undo(self, y: Tensor) -> Tensor:
        _check_image(y.shape[1:], "Squeeze.inverse")
        b, c, h, w = y.shape
        if c % 4:
            raise InputError(f"Squeeze.inverse needs a channel count divisible by 4, got {c}")
        y = y.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(b, c // 4, 2 * h, 2 * w)


class Unsqueeze(_Permutation):
    """Depth-to-space: ``(4C, H, W) -> (C, 2H, 2W)``; the inverse of :class:`Squeeze`."""

    def __init__(self) -> None:
        super().__init__()
        self._squeeze = Squeeze()

    @classmethod
    def examples(cls) -> list[Example]:
        return [(cls(), example_inputs(3, 8, 2, 2))]

    def output_shape(self, event_shape: Shape) -> Shape:
        _check_image(event_shape, "Unsqueeze")
        c, h, w = event_shape
        if c % 4:
            raise InputError(f"Unsqueeze needs a channel count divisible by 4, got {c}")
        return (c // 4, 2 * h, 2 * w)

    def input_shape_of(self, output_event_shape: Shape) -> Shape:
        c, h, w = output_event_shape
        return (4 * c, h // 2, w // 2)

    def transform(self, x: Tensor) -> Tensor:
        self.output_shape(tuple(x.shape[1:]))
        return self._squeeze._undo(x)

    def _undo(self, y: Tensor) -> Tensor:
        return self._squeeze.transform(y)


class Reshape(_Permutation):
    """Reshape the event from ``in_shape`` to ``out_shape`` (same number of entries)."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = tuple(int(s) for s in out_shape)
        if math.prod(self.in_shape) != math.prod(self.out_shape):
            raise InputError(f"Reshape cannot map {self.in_shape} to {self.out_shape}: sizes differ")

    @classmethod
    def examples(cls) -> list[Example]:
        return [(cls((2, 3, 2), (3, 4)), example_inputs(3, 2, 3, 2))]

    def extra_repr(self) -> str:
        return f"{self.in_shape} -> {self.out_shape}"

    def output_shape(self, event_shape: Shape) -> Shape:
        if tuple(event_shape) != self.in_shape:
            raise InputError(f"Reshape expects event shape {self.in_shape}, got {tuple(event_shape)}")
        return self.out_shape

    def input_shape_of(self, output_event_shape: Shape) -> Shape:
        return self.in_shape

    def transform(self, x: Tensor) -> Tensor:
        self._check_event_shape(x, self.in_shape, "inputs")
        return x.reshape(x.shape[0], *self.out_shape)

    def _undo(self, y: Tensor) -> Tensor:
        self._check_event_shape(y, self.out_shape, "outputs")
        return y.reshape(y.shape[0], *self.in_shape)


class Flatten(Reshape):
    """Flatten the event ``in_shape`` into a vector of ``prod(in_shape)`` entries."""

    def __init__(self, in_shape: Sequence[int]) -> None:
        super().__init__(in_shape, (math.prod(tuple(in_shape)),))

    @classmethod
    def examples(cls) -> list[Example]:
        return [(cls((2, 3, 2)), example_inputs(3, 2, 3, 2))]

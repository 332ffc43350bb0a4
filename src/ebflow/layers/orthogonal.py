r"""Fixed orthogonal mixing: the orthonormal discrete cosine transform (DCT-II).

An orthogonal map has :math:`|\det| = 1` and inverse :math:`Q^{-1} = Q^\top`: exact log-density
and sampling at no cost, with every output depending on every input along the mixed axes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Example, Shape, example_inputs
from .generic import GenericLinear

__all__ = ["DCT", "dct_matrix"]


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    r"""The orthonormal ``n x n`` DCT-II matrix
    :math:`C_{ki} = \sqrt{2/n}\, s_k \cos(\pi (2i + 1) k / 2n)`, :math:`s_0 = 1/\sqrt2`, else 1."""
    k = torch.arange(n, dtype=torch.float64).view(n, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, n)
    c = math.sqrt(2.0 / n) * torch.cos(math.pi * (2 * i + 1) * k / (2 * n))
    c[0] /= math.sqrt(2.0)
    return c.to(dtype)


@functools.lru_cache(maxsize=32)
def _dct(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """:func:`dct_matrix` built in float64, cast once per (size, dtype, device); a normal tensor
    even when first asked for under ``torch.inference_mode``."""
    with torch.inference_mode(False):
        return dct_matrix(n, dtype).to(device)


class DCT(GenericLinear):
    r"""Fixed orthogonal mixing by the orthonormal DCT-II: on vectors ``(D,)``,
    :math:`y = C_D x`; on images ``(C, H, W)``, per channel :math:`Y = C_H X C_W^\top`.

    :math:`\log|\det| = 0` exactly; inverse :math:`X = C_H^\top Y C_W`. No parameters.
    Cost: ``transform`` and inverse :math:`O(B D^2)` on vectors, :math:`O(B\,CHW(H + W))` on
    images; no factorisation, no dense matrix (``max_dim`` bounds only the reference
    :meth:`matrix`).
    """

    dense = False
    caches_derived_values = False  # log|det| = 0 and no factors: nothing worth a cache key

    def __init__(self, event_shape: Sequence[int], **options: Any) -> None:
        shape = tuple(event_shape)
        if len(shape) not in (1, 3):
            raise ConfigError(
                f"DCT acts on vectors (D,) or images (C, H, W), got event shape {event_shape!r}"
            )
        super().__init__(shape, **options)
        self._sizes = (shape[0], shape[0]) if len(shape) == 1 else shape[1:]

    @classmethod
    def examples(cls) -> list[Example]:
        return [
            (cls((5,)).double(), example_inputs(4, 5)),
            (cls((2, 3, 4)).double(), example_inputs(4, 2, 3, 4)),
        ]

    def _matrices(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The DCT matrices along the mixed axes, float64-exact, in ``like``'s dtype and device."""
        return tuple(_dct(n, like.dtype, like.device) for n in self._sizes)  # type: ignore[return-value]

    def transform(self, x: Tensor) -> Tensor:
        self._check_event_shape(x, self.event_shape, "inputs")
        rows, cols = self._matrices(x)
        if len(self.event_shape) == 1:
            return x @ rows.T
        return rows @ x @ cols.T

    def _log_abs_det(self, event_shape: Shape) -> Tensor:
        return torch.zeros((), dtype=torch.float64)

    def _factorize(self, event_shape: Shape) -> Any:  # orthogonal: the inverse is the transpose
        return None

    def _inverse_with(self, factors: object, y: Tensor) -> Tensor:
        self._check_event_shape(y, self.event_shape, "outputs")
        rows, cols = self._matrices(y)
        if len(self.event_shape) == 1:
            return y @ rows
        return rows.T @ y @ cols

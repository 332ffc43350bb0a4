"""Element-wise non-linear bijections (the set S_nl): their log-determinant is in the energy."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, InputError
from ..utils import sum_except_batch
from .base import Example, FlowLayer, example_inputs

__all__ = [
    "SmoothLeakyReLU",
    "ResidualSmoothLeakyReLU",
    "LeakyReLU",
    "Logit",
    "Sigmoid",
    "invert_increasing",
]


#: :func:`invert_increasing` tests convergence (a device read) once per this many Newton steps.
_NEWTON_CHECK_EVERY = 4


def invert_increasing(
    f: Callable[[Tensor], Tensor],
    df: Callable[[Tensor], Tensor],
    y: Tensor,
    *,
    f0: float,
    min_slope: float,
    max_slope: float,
    max_iter: int = 100,
) -> Tensor:
    r"""Solve :math:`f(x) = y` element-wise for an increasing :math:`f` with
    :math:`f' \in [m, M]` and :math:`f(0) = f_0`, by Newton steps safeguarded by bisection.

    The root lies between :math:`(y - f_0)/M` and :math:`(y - f_0)/m`, which gives the bracket.
    Works in float64 internally and returns ``y``'s dtype.
    """
    yd = y.detach().double()
    a = (yd - f0) / max_slope
    b = (yd - f0) / min_slope
    margin = 1e-9 * (1 + yd.abs())  # guards the bracket against rounding in f0
    lo, hi = torch.minimum(a, b) - margin, torch.maximum(a, b) + margin
    x = a.clone()
    tol = 4 * torch.finfo(torch.float64).eps
    for it in range(max_iter):
        fx = f(x) - yd
        lo = torch.where(fx < 0, x, lo)
        hi = torch.where(fx > 0, x, hi)
        step = fx / df(x)
        x_new = x - step
        outside = (x_new < lo) | (x_new > hi)
        x_new = torch.where(outside, 0.5 * (lo + hi), x_new)
        converged = (x_new - x).abs() <= tol * (1 + x.abs())
        x = x_new
        # one device read per _NEWTON_CHECK_EVERY steps: extra steps at the root change nothing
        if it % _NEWTON_CHECK_EVERY == _NEWTON_CHECK_EVERY - 1 and bool(converged.all()):
            break
    return x.to(y.dtype)


class SmoothLeakyReLU(FlowLayer):
    r"""Smooth leaky ReLU :math:`y = \alpha x + (1 - \alpha)\,\mathrm{softplus}(x)`.

    :math:`y' = \alpha + (1 - \alpha)\sigma(x) \in (\alpha, 1)`; the inverse is found by
    safeguarded Newton iterations. ``0 < alpha < 1``.
    """

    def __init__(self, alpha: float = 0.3) -> None:
        super().__init__()
        if not 0.0 < alpha < 1.0:
            raise ConfigError(f"SmoothLeakyReLU needs 0 < alpha < 1, got alpha={alpha}")
        self.alpha = float(alpha)

    @classmethod
    def examples(cls) -> list[Example]:
        return [(cls(0.3), example_inputs(5, 4)), (cls(0.6), example_inputs(5, 1, 2, 2))]

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"

    def _f(self, x: Tensor) -> Tensor:
        return self.alpha * x + (1 - self.alpha) * F.softplus(x)

    def _df(self, x: Tensor) -> Tensor:
        return self.alpha + (1 - self.alpha) * torch.sigmoid(x)

    def _linear_slope(self) -> float:
        """The slope ``c`` of the linear part: alpha here, 1 + alpha in the residual form."""
        return self.alpha

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # _f and log _df in the fewest element-wise passes (each one is differentiated up to
        # three times by score matching): c x + (1 - alpha) softplus(x), log(c + (1 - alpha) sigmoid(x))
        c = self._linear_slope()
        y = torch.add(x * c, F.softplus(x), alpha=1 - self.alpha)
        return y, sum_except_batch(torch.log(torch.sigmoid(x) * (1 - self.alpha) + c))

    def inverse(self, y: Tensor) -> Tensor:
        f0 = (1 - self.alpha) * math.log(2.0)
        return invert_increasing(self._f, self._df, y, f0=f0, min_slope=self.alpha, max_slope=1.0)


class ResidualSmoothLeakyReLU(SmoothLeakyReLU):
    r"""Residual smooth leaky ReLU :math:`y = x + \alpha x + (1 - \alpha)\,\mathrm{softplus}(x)`.

    :math:`y' = 1 + \alpha + (1 - \alpha)\sigma(x) \in (1 + \alpha, 2)`.
    """

    @classmethod
    def examples(cls) -> list[Example]:
        return [(cls(0.3), example_inputs(5, 4)), (cls(0.6), example_inputs(5, 1, 2, 2))]

    def _linear_slope(self) -> float:
        return 1 + self.alpha

    def _f(self, x: Tensor) -> Tensor:
        return x + super()._f(x)

    def _df(self, x: Tensor) -> Tensor:
        return 1 + super()._df(x)

    def inverse(self, y: Tensor) -> Tensor:
        f0 = (1 - self.alpha) * math.log(2.0)
        return invert_increasing(self._f, self._df, y, f0=f0, min_slope=1 + self.alpha, max_slope=2.0)


class LeakyReLU(FlowLayer):
    r"""Leaky ReLU :math:`y = x` for :math:`x \ge 0`, :math:`\alpha x` otherwise (``alpha > 0``).

    :math:`\log|\det| = \log\alpha \cdot \#\{x_i < 0\}`.
    """

    def __init__(self, alpha: float = 0.1) -> None:
        super().__init__()
        if not alpha > 0.0:
            raise ConfigError(f"LeakyReLU needs alpha > 0 to be invertible, got alpha={alpha}")
        self.alpha = float(alpha)

    @classmethod
    def examples(cls) -> list[Example]:
        return [(cls(0.2), example_inputs(5, 4)), (cls(2.0), example_inputs(5, 1, 2, 2))]

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        negative = x < 0
        y = torch.where(negative, self.alpha * x, x)
        logdet = sum_except_batch(negative.to(x.dtype)) * math.log(self.alpha)
        return y, logdet

    def inverse(self, y: Tensor) -> Tensor:
        return torch.where(y < 0, y / self.alpha, y)


def _check_unit_interval(x: Tensor, owner: str) -> None:
    if not bool(((x > 0) & (x < 1)).all()):
        bad = x[~((x > 0) & (x < 1))]
        raise InputError(
            f"{owner} is defined on (0, 1) only; got {bad.numel()} values outside it "
            f"(e.g. {float(bad.flatten()[0]):.4g})"
        )


class Logit(FlowLayer):
    r"""Logit :math:`y = \log x - \log(1 - x)` on :math:`(0, 1)`.

    :math:`\log|\det| = -\sum_i [\log x_i + \log(1 - x_i)]`. Inputs outside ``(0, 1)`` raise
    :class:`~ebflow.errors.InputError`.
    """

    @classmethod
    def examples(cls) -> list[Example]:
        return [(cls(), torch.sigmoid(example_inputs(5, 4)))]

    def in_domain(self, x: Tensor) -> Tensor:
        """Examples whose every entry lies in ``(0, 1)``."""
        return ((x > 0) & (x < 1)).reshape(x.shape[0], -1).all(dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_unit_interval(x.detach(), "Logit")
        log_x, log_1mx = torch.log(x), torch.log1p(-x)
        return log_x - log_1mx, -sum_except_batch(log_x + log_1mx)

    def inverse(self, y: Tensor) -> Tensor:
        return torch.sigmoid(y)


class Sigmoid(FlowLayer):
    r"""Sigmoid :math:`y = 1 / (1 + e^{-x})`.

    :math:`\log|\det| = \sum_i [\log\sigma(x_i) + \log\sigma(-x_i)]`.
    """

    @classmethod
    def examples(cls) -> list[Example]:
        return [(cls(), example_inputs(5, 4))]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.sigmoid(x), sum_except_batch(F.logsigmoid(x) + F.logsigmoid(-x))

    def inverse(self, y: Tensor) -> Tensor:
        _check_unit_interval(y.detach(), "Sigmoid.inverse")
        return torch.log(y) - torch.log1p(-y)

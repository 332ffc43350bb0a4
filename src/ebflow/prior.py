"""Prior (latent) distributions of a flow."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .utils import sum_except_batch

__all__ = ["StandardNormal", "Laplace", "PRIORS", "PriorLike"]


class PriorLike(Protocol):
    """What :class:`~ebflow.EBFlow` calls on its prior (a module such as :class:`StandardNormal`:
    ``nn.Module.__getattr__`` hides its methods from type checkers)."""

    def log_prob(self, z: Tensor) -> Tensor:
        r""":math:`\log p_u(z)` summed over each example's entries, shape ``(batch,)``."""
        ...

    def sample(
        self,
        shape: Sequence[int],
        *,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Independent draws of shape ``shape`` in ``dtype`` on ``device``."""
        ...


class StandardNormal(nn.Module):
    r"""Standard normal prior: :math:`\log p_u(z) = -\tfrac12\|z\|^2 - \tfrac{D}{2}\log 2\pi`."""

    def log_prob(self, z: Tensor) -> Tensor:
        """Log-density of each example of ``z`` (shape ``(batch, ...)``); returns ``(batch,)``."""
        d = z[0].numel()
        return -0.5 * sum_except_batch(z.pow(2)) - 0.5 * d * math.log(2 * math.pi)

    def sample(
        self,
        shape: Sequence[int],
        *,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``shape`` standard normal values."""
        return torch.randn(tuple(shape), dtype=dtype, device=device, generator=generator)

    def from_standard_normal(self, n: Tensor) -> Tensor:
        """Draws of this prior from standard normal draws ``n``: ``n`` itself."""
        return n


class Laplace(nn.Module):
    r"""Factorised Laplace prior of scale :math:`b`:
    :math:`\log p_u(z) = -\|z\|_1 / b - D \log 2b` (the reference code's ML prior, :math:`b = 1`)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ConfigError(f"Laplace prior needs a finite scale > 0, got {scale!r}")
        self.scale = float(scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"

    def log_prob(self, z: Tensor) -> Tensor:
        """Log-density of each example of ``z`` (shape ``(batch, ...)``); returns ``(batch,)``."""
        d = z[0].numel()
        return -sum_except_batch(z.abs()) / self.scale - d * math.log(2 * self.scale)

    def sample(
        self,
        shape: Sequence[int],
        *,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Draw ``shape`` Laplace values: :math:`z = b\,s\,e` with a random sign :math:`s` and
        :math:`e = -\log(1 - u) \sim \mathrm{Exp}(1)`, :math:`u \sim U[0, 1)`."""
        shape = tuple(shape)
        u = torch.rand(shape, dtype=dtype, device=device, generator=generator)
        sign = torch.randint(0, 2, shape, device=device, generator=generator).to(dtype) * 2 - 1
        return self.scale * sign * -torch.log1p(-u)

    def from_standard_normal(self, n: Tensor) -> Tensor:
        r"""Laplace draws from standard normal ones by matching quantiles,
        :math:`z = F^{-1}(\Phi(n)) = -b\,\mathrm{sign}(n)\,\log 2\Phi(-|n|)` (exact, stable in
        the tails through :func:`torch.special.log_ndtr`)."""
        return -self.scale * torch.sign(n) * (math.log(2.0) + torch.special.log_ndtr(-n.abs()))


#: Priors by config name (``prior``).
PRIORS: dict[str, type[nn.Module]] = {"normal": StandardNormal, "laplace": Laplace}

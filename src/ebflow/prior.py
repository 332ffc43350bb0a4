"""Prior (latent) distributions of a flow."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .utils import sum_except_batch

__all__ = ["StandardNormal"]


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

"""Prior (latent) distributions of a flow."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["StandardNormal"]


class StandardNormal(nn.Module):
    r"""Standard normal prior: :math:`\log p_u(z) = -\tfrac12\|z\|^2 - \tfrac{D}{2}\log 2\pi`."""

    def log_prob(self, z: Tensor) -> Tensor:
        """Log-density of each example of ``z`` (shape ``(batch, ...)``); returns ``(batch,)``."""
        flat = z.reshape(z.shape[0], -1)
        d = flat.shape[1]
        return -0.5 * flat.pow(2).sum(dim=1) - 0.5 * d * math.log(2 * math.pi)

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

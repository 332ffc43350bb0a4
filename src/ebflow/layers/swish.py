r"""Swish with a learnable slope per feature, :math:`f(x) = x\,\sigma(\beta x)`.

Plain tensor operations: autograd (and ``torch.func``) give every derivative order exactly, as
score matching needs (the score, a Hessian-vector product, then the parameters' gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError

__all__ = ["LearnableSwish"]


class LearnableSwish(nn.Module):
    r""":math:`f(x) = x\,\sigma(\beta \odot x)` on inputs ``(batch, features)``, one learnable
    :math:`\beta` per feature (initialised to 1: SiLU at the start)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        if not isinstance(features, int) or features < 1:
            raise ConfigError(f"LearnableSwish needs a positive number of features, got {features!r}")
        self.features = features
        self.beta = nn.Parameter(torch.ones(features))

    def extra_repr(self) -> str:
        return f"features={self.features}"

    def forward(self, x: Tensor) -> Tensor:
        r""":math:`x\,\sigma(\beta \odot x)` for ``x`` of shape ``(batch, features)``."""
        if x.dim() != 2 or x.shape[1] != self.features:
            raise InputError(
                f"LearnableSwish({self.features}) expects inputs of shape "
                f"(batch, {self.features}), got {tuple(x.shape)}"
            )
        return x * torch.sigmoid(self.beta * x)

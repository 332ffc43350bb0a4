"""Helpers shared by several test files (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
from torch import nn

from ebflow import EBFlow
from ebflow.layers import GenericLinear


def brute_force_log_prob(model: EBFlow, x: torch.Tensor) -> torch.Tensor:
    """log p_u(g(x)) + log|det dg/dx| with the full Jacobian from autograd and slogdet (float64)."""
    out = []
    for xi in x:
        def g(v: torch.Tensor) -> torch.Tensor:
            return model(v.reshape(1, *model.event_shape)).reshape(-1)

        jac = torch.autograd.functional.jacobian(g, xi.reshape(-1))
        z = g(xi.reshape(-1)).reshape(1, *model.latent_shape)
        out.append(model.prior.log_prob(z)[0] + torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


class RowMixing(GenericLinear):
    """The README's custom layer: one learnable W x W matrix mixing every image row, plus a bias."""

    def __init__(self, event_shape: tuple[int, int, int]) -> None:
        super().__init__(event_shape)
        width = event_shape[-1]
        self.weight = nn.Parameter(torch.eye(width) + 0.1 * torch.randn(width, width))
        self.bias = nn.Parameter(torch.zeros(event_shape))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias

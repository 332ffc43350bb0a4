"""Shared helpers for the tests: small random models in float64."""

from __future__ import annotations

import pytest
import torch

from ebflow import EBFlow
from ebflow.layers import (
    ActNorm,
    AffineCoupling,
    Conv1x1,
    Conv2d,
    Dense,
    FixedAffine,
    Flatten,
    LeakyReLU,
    Logit,
    ResidualSmoothLeakyReLU,
    Sigmoid,
    SmoothLeakyReLU,
    Squeeze,
    Unsqueeze,
)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny models: avoids OpenMP spin-waiting on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def restore_threads():
    """Restore torch's intra-op thread count after a test (runs set ``num_threads``)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


def perturb(model: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Move every parameter away from its (often identity-like) initial value."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def vector_model(d: int = 4) -> EBFlow:
    """Every vector layer type: dense in all four parameterisations and all non-linearities."""
    layers = [
        Dense(d, parameterization="full"),
        SmoothLeakyReLU(0.3),
        Dense(d, parameterization="tril"),
        LeakyReLU(0.5),
        Dense(d, parameterization="triu"),
        ResidualSmoothLeakyReLU(0.2),
        Dense(d, parameterization="lu"),
        ActNorm(d),
        AffineCoupling((d,), hidden=8),
        Sigmoid(),
        FixedAffine(-1.0, 1.0),  # maps (0, 1) onto itself
        Logit(),
        AffineCoupling((d,), hidden=8, swap=True),
        Dense(d),
    ]
    return EBFlow(layers, (d,)).double()


def image_model_1ch() -> EBFlow:
    """Convolutions (3x3 and 5x5) on 1x4x4, squeeze, 1x1 conv, ActNorm, CNN coupling, dense."""
    layers = [
        Conv2d(1, 3),
        ResidualSmoothLeakyReLU(0.3),
        Conv2d(1, 5),
        Squeeze(),
        Conv1x1(4, bias=True),
        ActNorm(4),
        AffineCoupling((4, 2, 2), hidden=8),
        Conv2d(4, 3),
        SmoothLeakyReLU(0.3),
        Flatten((4, 2, 2)),
        Dense(16),
    ]
    return EBFlow(layers, (1, 4, 4)).double()


def image_model_2ch() -> EBFlow:
    """Convolutions on 2x4x4 with squeeze/unsqueeze around a 1x1 conv and a coupling."""
    layers = [
        Conv2d(2, 3),
        SmoothLeakyReLU(0.3),
        Conv2d(2, 1),
        Squeeze(),
        Conv1x1(8),
        AffineCoupling((8, 2, 2), hidden=8, swap=True),
        Unsqueeze(),
        ActNorm(2),
        Conv2d(2, 3),
    ]
    return EBFlow(layers, (2, 4, 4)).double()


def initialised(model: EBFlow, x: torch.Tensor, scale: float = 0.3) -> EBFlow:
    """Run the data-dependent initialisation (ActNorm) on ``x``, then perturb all parameters."""
    model.initialize(x)
    return perturb(model, scale)

"""The sampling conventions flow users expect (zuko, nflows, torch.distributions): ``sample``
takes a sample shape, and ``sample_and_log_prob`` returns exact log-densities with the samples."""

from __future__ import annotations

import pytest
import torch

from ebflow import EBFlow
from ebflow.errors import InputError
from ebflow.layers import Conv2d, Dense, ResidualSmoothLeakyReLU, SmoothLeakyReLU, Squeeze
from helpers import brute_force_log_prob


def _model(image: bool = False) -> EBFlow:
    torch.manual_seed(0)
    if image:
        model = EBFlow([Conv2d(1, 3), ResidualSmoothLeakyReLU(0.3), Squeeze(), Conv2d(4, 3)], (1, 4, 4))
    else:
        model = EBFlow([Dense(3), SmoothLeakyReLU(0.3), Dense(3)], (3,))
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("image", [False, True])
@pytest.mark.parametrize(
    "shape, expected",
    [(4, (4,)), ((4,), (4,)), (torch.Size([2, 3]), (2, 3)), ((), ()), ((1, 2, 1), (1, 2, 1))],
)
def test_sample_takes_a_sample_shape(image, shape, expected):
    model = _model(image)
    x = model.sample(shape, generator=torch.Generator().manual_seed(1))
    assert x.shape == (*expected, *model.event_shape)
    # the same draws whatever the shape: the first rows of a flat draw of the same count
    n = 1
    for s in expected:
        n *= s
    flat = model.sample(n, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x.reshape(n, *model.event_shape), flat)


@pytest.mark.parametrize("bad", ["3", 0, (2, 0), (2, -1), 2.5, None, [[2]]])
def test_bad_sample_shapes_are_clear_errors(bad):
    with pytest.raises(InputError, match="sample_shape"):
        _model().sample(bad)


@pytest.mark.parametrize("image", [False, True])
def test_sample_and_log_prob_gives_the_exact_log_density_of_each_sample(image):
    model = _model(image)
    x, log_p = model.sample_and_log_prob((2, 3), generator=torch.Generator().manual_seed(2))
    assert x.shape == (2, 3, *model.event_shape) and log_p.shape == (2, 3)
    flat = x.reshape(6, *model.event_shape)
    torch.testing.assert_close(log_p.reshape(6), brute_force_log_prob(model, flat), atol=1e-8, rtol=0)
    again, _ = model.sample_and_log_prob((2, 3), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(again, x, atol=0, rtol=0)

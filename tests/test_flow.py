"""Exactness of the EBFlow density, inverse and sampling (the cache of log Z: test_cache.py)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import image_model_1ch, image_model_2ch, initialised, perturb, vector_model
from ebflow import EBFlow, coupling_flow, glow_flow
from ebflow.layers import Conv2d, Dense, LinearFlowLayer
from helpers import brute_force_log_prob


def glow_split_model() -> EBFlow:
    """Multi-scale Glow: squeeze, [ActNorm, 1x1 conv, coupling], split prior, then the second
    level on the kept half only (wrapped layers on a flat event)."""
    return glow_flow((1, 4, 4), levels=2, steps=2, hidden=8).double()


MODELS = {
    "glow-split": (glow_split_model, (1, 4, 4)),
    "vector": (vector_model, (4,)),
    "conv-1x4x4": (image_model_1ch, (1, 4, 4)),
    "conv-2x4x4": (image_model_2ch, (2, 4, 4)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_log_prob_matches_change_of_variables_by_brute_force(name):
    build, shape = MODELS[name]
    x = torch.randn(16, *shape, dtype=torch.float64)
    model = initialised(build(), x)
    expected = brute_force_log_prob(model, x[:5])
    with torch.no_grad():
        got = model.log_prob(x[:5])
        z, logdet = model.forward_with_log_det(x[:5])
    torch.testing.assert_close(got, expected, atol=1e-8, rtol=0)
    torch.testing.assert_close(model.prior.log_prob(z) + logdet, expected, atol=1e-8, rtol=0)


@pytest.mark.parametrize("parameterization", ["full", "tril", "triu", "lu"])
def test_each_dense_parameterization_alone(parameterization):
    model = perturb(EBFlow([Dense(3, parameterization=parameterization)], (3,)).double())
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(model.log_prob(x).detach(), brute_force_log_prob(model, x), atol=1e-8, rtol=0)


def test_density_of_2d_model_integrates_to_one():
    model = coupling_flow(2, blocks=3, hidden=16).double()
    data = torch.randn(256, 2, dtype=torch.float64)
    initialised(model, data, scale=0.15)
    n, half_width = 801, 9.0
    ticks = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    grid = torch.cartesian_prod(ticks, ticks)
    with torch.no_grad():
        density = torch.cat([model.log_prob(chunk).exp() for chunk in grid.split(40_000)])
    cell = (ticks[1] - ticks[0]) ** 2
    mass = float(density.sum() * cell)
    assert abs(mass - 1.0) < 1e-3, mass


@pytest.mark.parametrize("name", list(MODELS))
def test_inverse_of_forward_is_identity(name):
    build, shape = MODELS[name]
    x = torch.randn(16, *shape, dtype=torch.float64)
    model = initialised(build(), x)
    with torch.no_grad():
        torch.testing.assert_close(model.inverse(model(x)), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_layer_inverts_its_forward(name):
    build, shape = MODELS[name]
    x = torch.randn(16, *shape, dtype=torch.float64)
    model = initialised(build(), x)
    h = x
    with torch.no_grad():
        for layer in model.layers:
            y, logdet = layer(h)
            assert logdet.shape == (h.shape[0],)
            torch.testing.assert_close(layer.inverse(y), h, atol=1e-6, rtol=0)
            h = y


@pytest.mark.parametrize("name", list(MODELS))
def test_sample_shape_and_finiteness(name):
    build, shape = MODELS[name]
    model = initialised(build(), torch.randn(16, *shape, dtype=torch.float64), scale=0.1)
    samples = model.sample(7)
    assert samples.shape == (7, *shape)
    assert samples.dtype == torch.float64
    assert torch.isfinite(samples).all()
    assert not samples.requires_grad


def test_samples_follow_the_model_density():
    """Samples by inversion of a Gaussian model (one dense layer) have its mean and covariance."""
    model = perturb(EBFlow([Dense(2)], (2,)).double(), 0.5)
    w = model.layers[0].matrix().detach()
    b = model.layers[0].bias.detach()
    mean = -torch.linalg.solve(w, b)
    cov = torch.linalg.inv(w.T @ w)
    s = model.sample(200_000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(s.T), cov, atol=0.03 * float(cov.abs().max()), rtol=0)


def test_float32_model_works_and_matches_float64():
    model64 = initialised(vector_model(), torch.randn(32, 4, dtype=torch.float64), 0.2)
    model32 = vector_model().float()
    model32.load_state_dict(model64.state_dict())
    x = torch.randn(8, 4, dtype=torch.float64)
    lp64 = model64.log_prob(x)
    lp32 = model32.log_prob(x.float())
    assert lp32.dtype == torch.float32
    torch.testing.assert_close(lp32.double(), lp64, atol=1e-3, rtol=1e-4)
    assert torch.isfinite(model32.sample(5)).all()


def test_log_partition_is_differentiable_for_maximum_likelihood():
    model = perturb(EBFlow([Dense(3), Dense(3, parameterization="lu")], (3,)).double())
    logz = model.log_partition()
    logz.backward()
    w = model.layers[0].weight
    expected = -torch.linalg.inv(w.detach()).T  # d(-log|det W|)/dW
    torch.testing.assert_close(w.grad, expected)


def test_conv_log_det_gradient_matches_matrix_formula():
    layer = perturb(Conv2d(1, 3).double(), 0.1)
    model = EBFlow([layer], (1, 4, 4)).double()
    model.log_partition().backward()
    weight = layer.weight.detach().clone().requires_grad_(True)
    from ebflow.layers import convolution_matrix

    (-torch.linalg.slogdet(convolution_matrix(weight, (1, 4, 4)))[1]).backward()
    torch.testing.assert_close(layer.weight.grad, weight.grad)


def test_score_is_minus_energy_gradient_and_ignores_log_partition():
    model = initialised(vector_model(), torch.randn(32, 4, dtype=torch.float64))
    x = torch.randn(6, 4, dtype=torch.float64)
    s = model.score(x)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.log_prob(xg).sum(), xg)
    torch.testing.assert_close(s, grad)


def test_linear_layers_listed():
    model = vector_model().initialize(torch.randn(8, 4, dtype=torch.float64))
    assert all(isinstance(l, LinearFlowLayer) for l in model.linear_layers)
    assert len(model.linear_layers) == 7
    assert model.dim == 4
    assert math.isfinite(float(model.log_partition().detach()))


def test_glow_split_prior_factors_out_half_of_the_channels():
    model = glow_split_model()
    assert model.latent_shape == (16,)
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    initialised(model, x)
    split_at = next(i for i, l in enumerate(model.layers) if type(l).__name__ == "Flatten")
    with torch.no_grad():
        h = x
        for layer in model.layers[:split_at]:  # level 1 and its split prior: (4, 2, 2)
            h = layer(h)[0]
        h2 = h.clone()
        h2[:, 2:] += torch.randn_like(h2[:, 2:])  # change the factored-out half only

        def rest(t):
            for layer in model.layers[split_at:]:
                t = layer(t)[0]
            return t

        z, z2 = rest(h), rest(h2)
    torch.testing.assert_close(z2[:, :8], z[:, :8])  # later levels never see that half
    torch.testing.assert_close(z2[:, 8:], h2[:, 2:].reshape(8, -1))  # it goes straight to z
    wrapped = [l for l in model.layers if type(l).__name__ == "_LinearOnFirstPart"]
    assert wrapped and all(any(l is m for m in model.linear_layers) for l in wrapped)

"""Behaviour of individual layers beyond the density checks of test_flow.py."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import perturb
from ebflow import EBFlow, dense_flow, glow_flow
from ebflow.architectures import DENSE_FLOW_PARAMETERIZATIONS
from ebflow.errors import ConfigError, InputError
from ebflow.layers import (
    ActNorm,
    AffineCoupling,
    Conv1x1,
    Conv2d,
    Dense,
    LeakyReLU,
    ResidualSmoothLeakyReLU,
    SmoothLeakyReLU,
    Squeeze,
    Unsqueeze,
    random_orthogonal,
)


def test_actnorm_data_dependent_initialisation_is_explicit():
    layer = ActNorm(3).double()
    x = torch.randn(500, 3, 4, 4, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.2]).view(1, 3, 1, 1) + 2
    assert layer.requires_initialization
    layer.initialize(x)
    y = layer.transform(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert bool(layer.initialized) and not layer.requires_initialization
    before = layer.log_scale.detach().clone()
    layer.transform(x * 5)  # using the layer never re-initialises it
    torch.testing.assert_close(layer.log_scale.detach(), before)
    assert "initialized" in layer.state_dict()
    # log|det| = pixels per channel * sum(log_scale)
    torch.testing.assert_close(layer.log_abs_det((3, 4, 4)), 16 * before.sum())


def test_actnorm_used_before_initialisation_raises_a_clear_error():
    layer = ActNorm(2)
    x = torch.randn(4, 2)
    for use in (
        lambda: layer.transform(x),
        lambda: layer(x),
        lambda: layer.inverse(x),
        lambda: layer.log_abs_det((2,)),
    ):
        with pytest.raises(ConfigError, match=r"ActNorm is not initialized: call model.initialize\(x\)"):
            use()
    with pytest.raises(ConfigError, match="not initialized"):
        EBFlow([ActNorm(2), Dense(2)], (2,)).energy(x)
    with pytest.raises(InputError, match="at least two values per channel"):
        layer.initialize(torch.randn(1, 2))
    assert not bool(layer.initialized)


def test_actnorm_loaded_from_a_state_dict_needs_no_initialisation():
    trained = ActNorm(2)
    trained.initialize(torch.randn(16, 2) * 3 + 1)
    fresh = ActNorm(2)
    fresh.load_state_dict(trained.state_dict())
    assert not fresh.requires_initialization
    x = torch.randn(4, 2)
    torch.testing.assert_close(fresh.transform(x), trained.transform(x))
    # a state dict saved before initialisation brings the flag back to False
    trained.load_state_dict(ActNorm(2).state_dict())
    with pytest.raises(ConfigError, match="not initialized"):
        trained.transform(x)


def test_model_initialize_runs_every_layer_on_its_own_input_in_order():
    """Each ActNorm standardises the output of the layers before it, as they are after their
    own initialisation (also inside the wrappers of a multi-scale flow)."""
    model = EBFlow([ActNorm(3), Dense(3), SmoothLeakyReLU(0.3), ActNorm(3)], (3,)).double()
    perturb(model.layers[1])
    x = torch.randn(200, 3, dtype=torch.float64) * 4 - 1
    assert model.requires_initialization
    assert model.initialize(x) is model
    assert not model.requires_initialization
    with torch.no_grad():
        z = model(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    glow = glow_flow((1, 4, 4), levels=2, steps=1, hidden=4).double()
    assert glow.requires_initialization
    glow.initialize(torch.randn(8, 1, 4, 4, dtype=torch.float64))
    assert not glow.requires_initialization


def test_coupling_starts_as_identity_and_bounds_its_log_scale():
    layer = AffineCoupling((4,), hidden=8, scale_bound=1.5).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    y, logdet = layer(x)
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(logdet, torch.zeros(10, dtype=torch.float64))
    perturb(layer, 5.0)
    _, logdet = layer(x * 10)
    assert bool((logdet.abs() <= 1.5 * 2 + 1e-9).all())  # 2 moved entries, |s| <= 1.5 each


def test_image_coupling_keeps_shape():
    layer = perturb(AffineCoupling((3, 4, 4), hidden=8).double())
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    y, logdet = layer(x)
    assert y.shape == x.shape and logdet.shape == (2,)
    torch.testing.assert_close(y[:, :1], x[:, :1])  # first channel conditions the other two
    torch.testing.assert_close(layer.inverse(y), x)


@pytest.mark.parametrize(
    "cls, alpha",
    [(SmoothLeakyReLU, 0.3), (SmoothLeakyReLU, 0.01), (ResidualSmoothLeakyReLU, 0.3), (LeakyReLU, 0.2)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_elementwise_inverse_far_in_the_tails(cls, alpha, dtype):
    layer = cls(alpha)
    x = torch.tensor([[-1e3, -50.0, -3.0, -1e-8, 0.0, 1e-8, 2.0, 40.0, 1e4]], dtype=dtype)
    y, _ = layer(x)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(layer.inverse(y), x, atol=tol, rtol=tol)


def test_squeeze_is_a_permutation_and_unsqueeze_undoes_it():
    x = torch.arange(2 * 4 * 6, dtype=torch.float64).view(1, 2, 4, 6)
    y = Squeeze().transform(x)
    assert y.shape == (1, 8, 2, 3)
    assert sorted(y.flatten().tolist()) == x.flatten().tolist()
    # channel 0 of the output holds the top-left pixel of each 2x2 patch of channel 0
    torch.testing.assert_close(y[0, 0], x[0, 0, ::2, ::2])
    torch.testing.assert_close(Unsqueeze().transform(y), x)
    torch.testing.assert_close(Squeeze().inverse(y), x)


def test_convolution_matrix_reproduces_the_convolution():
    layer = perturb(Conv2d(2, 5).double(), 0.2)
    x = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    m = layer.matrix((2, 6, 5))
    expected = layer.transform(x) - layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close((x.reshape(3, -1) @ m.T).reshape(x.shape), expected)


def test_conv_log_det_of_a_causal_7x7_kernel_on_3x32x32():
    """A kernel whose taps after the centre (raster order) are zero gives a block-triangular
    matrix with the centre tap W_c on the diagonal: log|det| = H W log|det W_c| exactly."""
    c, k = 3, 7
    layer = Conv2d(c, k).double()
    with torch.no_grad():
        w = torch.randn(c, c, k, k, dtype=torch.float64) * 0.1
        mask = torch.zeros(k, k, dtype=torch.float64)
        mask.view(-1)[: k * k // 2] = 1.0  # taps strictly before the centre
        # y[i] depends on x[i - offset]: causal for conv2d (cross-correlation) means the *later* taps
        layer.weight.copy_(w * mask.flip(0, 1))
        centre = torch.eye(c, dtype=torch.float64) + 0.3 * torch.randn(c, c, dtype=torch.float64)
        layer.weight[:, :, k // 2, k // 2] = centre
    expected = 32 * 32 * torch.linalg.slogdet(centre)[1]
    got = layer.log_abs_det((c, 32, 32))
    torch.testing.assert_close(got, expected, atol=1e-8, rtol=1e-10)


def test_conv1x1_log_det_and_inverse():
    layer = perturb(Conv1x1(3, bias=True).double(), 0.2)
    x = torch.randn(4, 3, 5, 2, dtype=torch.float64)
    y, logdet = layer(x)
    torch.testing.assert_close(logdet[0], 10 * torch.linalg.slogdet(layer.weight)[1])
    torch.testing.assert_close(layer.inverse(y), x)


def test_dense_lu_matches_its_matrix_and_triangular_masks_hold():
    lu = perturb(Dense(4, parameterization="lu").double())
    w = lu.matrix()
    torch.testing.assert_close(lu.log_abs_det((4,)), torch.linalg.slogdet(w)[1])
    tril = perturb(Dense(4, parameterization="tril").double())
    assert torch.equal(torch.triu(tril.matrix(), 1), torch.zeros(4, 4, dtype=torch.float64))
    triu = perturb(Dense(4, parameterization="triu").double())
    assert torch.equal(torch.tril(triu.matrix(), -1), torch.zeros(4, 4, dtype=torch.float64))


def test_layers_follow_the_model_to_float64():
    model = EBFlow([Dense(3), Dense(3, parameterization="lu")], (3,))
    model.double()
    assert model.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert math.isfinite(float(model.log_partition().detach()))


def test_dense_flow_takes_exactly_its_parameterizations():
    for p in DENSE_FLOW_PARAMETERIZATIONS:
        first = dense_flow((3,), parameterization=p).layers[0]
        assert first.parameterization == ("tril" if p == "triangular_pair" else p)
    with pytest.raises(ConfigError, match="triangular_pair"):
        dense_flow((3,), parameterization="trilu")


def test_random_orthogonal_is_orthogonal_and_reproducible():
    """torch.nn.init.orthogonal_ on a float64 draw: the same matrix for the same RNG state."""
    q = random_orthogonal(6, torch.Generator().manual_seed(0))
    assert q.dtype == torch.get_default_dtype()
    torch.testing.assert_close(
        q.double() @ q.double().T, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(random_orthogonal(6, torch.Generator().manual_seed(0)), q, atol=0, rtol=0)
    torch.manual_seed(3)
    a = random_orthogonal(5)
    torch.manual_seed(3)
    assert torch.equal(random_orthogonal(5), a)
    torch.manual_seed(3)
    reference = torch.randn(5, 5, dtype=torch.float64)  # QR of a float64 Gaussian matrix, signs fixed
    qr, r = torch.linalg.qr(reference)
    torch.testing.assert_close(a, (qr * torch.sign(r.diagonal())).float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("layer", [SmoothLeakyReLU(0.3), ResidualSmoothLeakyReLU(0.2)])
def test_smooth_leaky_relu_forward_matches_the_function_its_inverse_solves(layer):
    """The forward pass is written in few element-wise passes; it must be exactly f and
    log f' (the functions the Newton inverse uses), and invert."""
    x = torch.randn(5, 7, dtype=torch.float64) * 8
    y, logdet = layer(x)
    torch.testing.assert_close(y, layer._f(x), rtol=1e-15, atol=1e-13)
    torch.testing.assert_close(logdet, torch.log(layer._df(x)).sum(1), rtol=1e-15, atol=1e-13)
    torch.testing.assert_close(layer.inverse(y), x, rtol=1e-12, atol=1e-12)

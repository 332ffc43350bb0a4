"""The library's fast paths stay exact: the same-padding convolution, the convolution matrix,
the linear prefix of score matching, and the large-block allocator setting.

They were tested next to the benchmark (which relies on them); they test the library.
"""

from __future__ import annotations

import functools

import pytest
import torch


def score_norm(conv, x, w, b):
    """d/dw of |d/dx sum(conv(x, w, b)^3)|^2: a score-matching style second derivative."""
    y = conv(x, w, b)
    (g,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    return torch.autograd.grad(g.pow(2).sum(), w)[0]


def test_same_padding_conv_matches_conv2d_to_second_order():
    import torch.nn.functional as F
    from torch.autograd import gradcheck, gradgradcheck

    from ebflow.layers.conv import same_padding_conv2d

    for c, k in ((1, 3), (3, 5)):
        x = torch.randn(2, c, 5, 5, dtype=torch.float64, requires_grad=True)
        w = torch.randn(c, c, k, k, dtype=torch.float64, requires_grad=True)
        b = torch.randn(c, dtype=torch.float64, requires_grad=True)
        assert torch.equal(same_padding_conv2d(x, w, b), F.conv2d(x, w, b, padding=k // 2))
        assert gradcheck(same_padding_conv2d, (x, w, b))
        assert gradgradcheck(same_padding_conv2d, (x, w, b))
        # a score-matching style second derivative agrees with the native convolution's
        ours = score_norm(same_padding_conv2d, x, w, b)
        native = score_norm(functools.partial(F.conv2d, padding=k // 2), x, w, b)
        assert torch.allclose(ours, native, rtol=1e-10, atol=1e-10)


def test_convolution_matrix_equals_convolving_the_basis():
    import torch.nn.functional as F

    from ebflow.layers.conv import convolution_matrix

    for c, h, w, k in ((1, 5, 4, 3), (2, 3, 3, 7), (3, 4, 6, 5)):
        weight = torch.randn(c, c, k, k, dtype=torch.float64, requires_grad=True)
        d = c * h * w
        basis = torch.eye(d, dtype=torch.float64).view(d, c, h, w)
        expected = F.conv2d(basis, weight, padding=k // 2).reshape(d, d).T
        got = convolution_matrix(weight, (c, h, w))
        assert torch.equal(got, expected)
        probe = torch.randn(d, d, dtype=torch.float64)
        g1 = torch.autograd.grad((got * probe).sum(), weight)[0]
        g2 = torch.autograd.grad((expected * probe).sum(), weight)[0]
        assert torch.allclose(g1, g2, rtol=1e-12, atol=1e-12)


def test_linear_prefix_splits_the_energy_exactly():
    from ebflow import EBFlow
    from ebflow.layers import ActNorm, Dense, Flatten, SmoothLeakyReLU
    from ebflow.objectives import fdssm_loss, ssm_loss

    model = EBFlow(
        [Flatten((1, 2, 3)), ActNorm(6), Dense(6), SmoothLeakyReLU(0.3), Dense(6)], (1, 2, 3)
    ).double()
    x = torch.randn(8, 1, 2, 3, dtype=torch.float64) * 2 + 1
    v = torch.randn_like(x)
    assert model.linear_prefix_length == 3
    model.initialize(x)  # ActNorm's data initialisation, on x (explicit since issue 9)
    # x requiring a gradient goes through the prefix on its own (not stacked with v)
    h, u = (t.detach() for t in model.linear_prefix(x.clone().requires_grad_(True), v))
    assert torch.allclose(
        model.layers[1](model.layers[0](x)[0])[0].mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-12
    )
    for sign in (1, -1):
        assert torch.allclose(
            model.tail_energy(h + sign * u), model.energy(x + sign * v), rtol=1e-12, atol=1e-10
        )
    # without a gradient to x, [x; v; 0] go through the prefix in one pass: same values
    h2, u2 = model.linear_prefix(x, v)
    assert torch.allclose(h2, h, rtol=1e-12, atol=1e-12)
    assert torch.allclose(u2, u, rtol=1e-12, atol=1e-12)
    # SSM through the prefix equals the textbook double backward with respect to x
    signs = torch.randn(1, *x.shape, dtype=torch.float64).sign()
    xr = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model.energy(xr).sum(), xr, create_graph=True)
    (hv,) = torch.autograd.grad((g * signs[0]).sum(), xr, create_graph=True)
    textbook = (-(hv * signs[0]).flatten(1).sum(1) + 0.5 * g.flatten(1).pow(2).sum(1)).mean()
    assert torch.allclose(
        ssm_loss(model, x, noise=signs).loss.mean(), textbook / 6, rtol=1e-12
    )  # per dimension
    assert torch.isfinite(fdssm_loss(model, x, 0.1, noise=v).loss).all()
    with pytest.raises(Exception, match="direction must have the shape"):
        model.linear_prefix(x, v[:3])


def test_reuse_large_allocations_is_idempotent():
    import platform

    from ebflow.runtime import large_allocation_reuse_active, reuse_large_allocations

    first = reuse_large_allocations()
    assert reuse_large_allocations() == first == large_allocation_reuse_active()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first
    big = torch.ones(3000, 3000)  # 36 MB: still an ordinary, correct tensor
    assert float(big.sum()) == 9e6

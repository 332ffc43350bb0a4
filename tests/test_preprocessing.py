"""Image preprocessing and the MaP switch."""

from __future__ import annotations

import math

import pytest
import torch

from ebflow import EBFlow, ImagePreprocessing, dense_flow
from ebflow.errors import ConfigError, InputError


def pixels(n=6, shape=(1, 3, 3)):
    return torch.randint(0, 256, (n, *shape)).double()


def test_forward_inverse_and_log_det():
    pre = ImagePreprocessing(smoothness=0.75, shift=1e-6)
    x = pre.dequantize(pixels())
    y, logdet = pre(x)
    torch.testing.assert_close(pre.inverse(y), x, atol=1e-8, rtol=0)
    # element-wise map: log|det| is the sum of log derivatives, checked by autograd
    xg = x.clone().requires_grad_(True)
    (dy,) = torch.autograd.grad(pre(xg)[0].sum(), xg)
    torch.testing.assert_close(logdet, dy.log().reshape(6, -1).sum(1))
    assert torch.equal(pre.to_pixels(y), x.floor())


def test_dequantize_range_and_errors():
    pre = ImagePreprocessing()
    x = pixels()
    xd = pre.dequantize(x)
    assert bool((xd >= x).all() and (xd < x + 1).all())
    with pytest.raises(InputError, match="pixel values"):
        pre.dequantize(x + 300)
    with pytest.raises(InputError, match="dequantised pixels"):
        pre(x - 5)
    with pytest.raises(ConfigError, match="smoothness"):
        ImagePreprocessing(smoothness=0)
    with pytest.raises(ConfigError, match="shift"):
        ImagePreprocessing(shift=0.7)


def test_map_and_in_model_preprocessing_give_the_same_data_likelihood():
    """MaP (outside) and the ablation (inside) define the same density in data space."""
    pre = ImagePreprocessing(smoothness=0.5)
    inner = dense_flow((1, 3, 3)).double()
    outside = EBFlow(list(inner.layers), (1, 3, 3)).double()
    inside = EBFlow(pre.as_layers() + list(inner.layers), (1, 3, 3)).double()
    x = pre.dequantize(pixels())
    y, logdet = pre(x)
    with torch.no_grad():
        map_log_prob = outside.log_prob(y) + logdet
        ablation_log_prob = inside.log_prob(x)
    torch.testing.assert_close(map_log_prob, ablation_log_prob)
    bpd = -map_log_prob / (9 * math.log(2))
    assert torch.isfinite(bpd).all()


def test_inverse_log_det_is_minus_the_forward_one_and_stable_far_out():
    pre = ImagePreprocessing(smoothness=0.75)
    x = pre.dequantize(pixels())
    y, logdet = pre(x)
    x_back, inv_logdet = pre.inverse_and_log_det(y)
    torch.testing.assert_close(x_back, x, atol=1e-8, rtol=0)
    torch.testing.assert_close(inv_logdet, -logdet)
    far = torch.tensor([[-200.0, 200.0]], dtype=torch.float64)
    assert torch.isfinite(pre.inverse_and_log_det(far)[1]).all()


def test_smoothness_divides_the_logit():
    """y = logit(p) / kappa, as in the paper's recipes (kappa = 0.5 doubles the logit)."""
    x = torch.tensor([[64.0, 192.0]], dtype=torch.float64)
    y, _ = ImagePreprocessing(smoothness=0.5, shift=0.0)(x)
    torch.testing.assert_close(y, torch.logit(x / 256) / 0.5)

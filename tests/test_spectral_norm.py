"""Spectrally normalised convolutions (the reference's CIFAR-CNN recipe): the normalised weight,
exactness of the density, inverse and samples for the weight ``transform`` uses, the cache, the
state dict, one power-iteration step per loss, and training steps."""

from __future__ import annotations

import pytest
import torch

from ebflow import EBFlow, conv_flow, make_objective
from ebflow.errors import ConfigError
from ebflow.layers import Conv2d, ResidualSmoothLeakyReLU, SmoothLeakyReLU, Squeeze
from ebflow.objectives import ml_loss
from helpers import accumulated_leaves, brute_force_log_prob

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb_originals(model: torch.nn.Module, scale: float = 0.4) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def sn_model(power_steps: int = 30) -> EBFlow:
    """Two spectrally normalised convolutions (3x3, 5x5) around non-linearities, then a squeeze
    and a plain convolution on 4 channels: 1x4x4 events (D = 16)."""
    layers = [
        Conv2d(1, 3, spectral_norm=True),
        ResidualSmoothLeakyReLU(0.3),
        Conv2d(1, 5, spectral_norm=True),
        SmoothLeakyReLU(0.3),
        Squeeze(),
        Conv2d(4, 3, spectral_norm=True),
    ]
    model = EBFlow(layers, (1, 4, 4)).double()
    _perturb_originals(model)
    for _ in range(power_steps):  # converge the power iterations (train mode: a step per access)
        for layer in _convs(model):
            _ = layer.weight
    return model


def _convs(model: EBFlow) -> list[Conv2d]:
    return [layer for layer in model.layers if isinstance(layer, Conv2d)]


def test_the_normalised_weight_has_unit_spectral_norm_and_is_fixed_in_eval_mode():
    torch.manual_seed(0)
    layer = Conv2d(3, 5, spectral_norm=True).double()
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(7.0).add_(torch.randn(3, 3, 5, 5, dtype=torch.float64))
    for _ in range(50):
        w = layer.weight
    assert torch.linalg.matrix_norm(w.reshape(3, -1), ord=2).item() == pytest.approx(1.0, abs=1e-3)
    # train mode: every access is one power-iteration step (the buffers move)
    u = layer.parametrizations.weight[0]._u
    version = u._version
    _ = layer.weight
    assert u._version > version
    # eval mode: a fixed map, bit for bit
    layer.eval()
    version = u._version
    assert torch.equal(layer.weight, layer.weight) and u._version == version
    assert "spectral_norm=True" in repr(layer)


def test_negative_identity_init_is_already_normalised():
    layer = Conv2d(2, 7, init="negative_identity", spectral_norm=True)
    kernel = torch.zeros(2, 2, 7, 7)
    kernel[:, :, 3, 3] = -torch.eye(2)
    torch.testing.assert_close(layer.weight, kernel, atol=1e-6, rtol=0)


def test_option_is_checked_and_off_by_default():
    with pytest.raises(ConfigError, match="spectral_norm"):
        Conv2d(2, 3, spectral_norm="yes")
    plain = conv_flow((1, 8, 8), blocks=2, kernel_size=3)
    normed = conv_flow((1, 8, 8), blocks=2, kernel_size=3, spectral_norm=True)
    convs = [l for l in normed.layers if isinstance(l, Conv2d)]
    assert len(convs) == 4 and all(l.spectral_norm and hasattr(l, "parametrizations") for l in convs)
    assert not any(hasattr(l, "parametrizations") for l in plain.layers)


def test_log_prob_matches_change_of_variables_by_brute_force_in_eval_mode():
    torch.manual_seed(1)
    model = sn_model().eval()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    expected = brute_force_log_prob(model, x)
    with torch.no_grad():
        got = model.log_prob(x)
        z, logdet = model.forward_with_log_det(x)
    torch.testing.assert_close(got, expected, atol=1e-8, rtol=0)
    torch.testing.assert_close(model.prior.log_prob(z) + logdet, expected, atol=1e-8, rtol=0)


def test_inverse_and_samples_are_exact_for_the_normalised_weight():
    torch.manual_seed(2)
    model = sn_model().eval()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.inverse(model(x)), x, atol=1e-9, rtol=0)
        samples = model.sample(5, generator=torch.Generator().manual_seed(0))
        z = model.prior.sample(
            (5, *model.latent_shape),
            dtype=torch.float64,
            device=model.device,
            generator=torch.Generator().manual_seed(0),
        )
        torch.testing.assert_close(model(samples), z, atol=1e-9, rtol=0)


def test_the_cache_follows_the_power_iteration_buffers_and_the_parameter():
    torch.manual_seed(3)
    model = sn_model().eval()
    layer = model.layers[0]

    def fresh() -> float:
        return float(torch.linalg.slogdet(layer.matrix((1, 4, 4)))[1])

    with torch.no_grad():
        first = float(layer.log_abs_det((1, 4, 4)))
        assert first == pytest.approx(fresh(), abs=1e-12)
        layer.train()
        _ = layer.weight  # one power step: u, v change in place
        layer.eval()
        assert float(layer.log_abs_det((1, 4, 4))) == pytest.approx(fresh(), abs=1e-12)
        layer.parametrizations.weight.original.add_(0.1)  # an optimiser-like update
        moved = float(layer.log_abs_det((1, 4, 4)))
        assert moved == pytest.approx(fresh(), abs=1e-12) and moved != pytest.approx(first, abs=1e-6)
        x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
        torch.testing.assert_close(model.inverse(model(x)), x, atol=1e-9, rtol=0)


def test_state_dict_round_trip_keeps_the_normalisation():
    torch.manual_seed(4)
    model = sn_model()
    state = model.state_dict()
    assert any(k.endswith("parametrizations.weight.original") for k in state)
    assert any(k.endswith("parametrizations.weight.0._u") for k in state)
    torch.manual_seed(99)
    other = EBFlow(
        [
            Conv2d(1, 3, spectral_norm=True),
            ResidualSmoothLeakyReLU(0.3),
            Conv2d(1, 5, spectral_norm=True),
            SmoothLeakyReLU(0.3),
            Squeeze(),
            Conv2d(4, 3, spectral_norm=True),
        ],
        (1, 4, 4),
    ).double()
    other.load_state_dict(state)
    model.eval(), other.eval()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(other.log_prob(x), model.log_prob(x), atol=0, rtol=0)
        for a, b in zip(_convs(model), _convs(other), strict=True):
            assert torch.equal(a.weight, b.weight)


def test_a_loss_runs_one_power_step_per_layer_and_uses_one_map():
    """In train mode ML evaluates every weight once: its value is -log p(x) of the model whose
    buffers are those after the loss (the eval-mode density with the same buffers)."""
    torch.manual_seed(5)
    model = sn_model(power_steps=0).train()  # far from converged: each step moves the map
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    u = model.layers[0].parametrizations.weight[0]._u
    before = u._version
    loss = ml_loss(model, x).loss
    assert u._version == before + 1  # one power-iteration step (it updates u once)
    with torch.no_grad():
        expected = -model.eval().log_prob(x)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "name, options", [("dsm", {"sigma": 0.1}), ("ssm", {}), ("ml", {}), ("fdssm", {"eps": 0.1})]
)
def test_training_steps_work_and_change_the_weight(name, options):
    torch.manual_seed(6)
    model = conv_flow((1, 8, 8), blocks=2, kernel_size=3, init="negative_identity", spectral_norm=True)
    x = torch.randn(16, 1, 8, 8)
    objective = make_objective(name, **options)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    start = model.layers[0].weight.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        loss = objective(model, x)
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        optimizer.step()
    assert not torch.equal(model.layers[0].weight.detach(), start)
    w = model.layers[0].weight.detach()
    assert torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2).item() == pytest.approx(1.0, abs=1e-2)


def test_dsm_gradient_of_the_normalised_weights_matches_finite_differences_in_eval_mode():
    torch.manual_seed(7)
    model = sn_model().eval()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    objective = make_objective("dsm", sigma=0.3)
    noise = torch.randn_like(x)
    model.zero_grad()
    objective(model, x, noise=noise).backward()
    original = model.layers[2].parametrizations.weight.original
    grad = original.grad.reshape(-1)
    flat = original.detach().view(-1)
    h = 1e-6
    for i in (0, 7, 12, 24):
        old = flat[i].item()
        with torch.no_grad():
            flat[i] = old + h
            up = objective(model, x, noise=noise).item()
            flat[i] = old - h
            down = objective(model, x, noise=noise).item()
            flat[i] = old
        assert (up - down) / (2 * h) == pytest.approx(grad[i].item(), abs=1e-6, rel=1e-5)


@pytest.mark.parametrize("name", ["ssm", "dsm"])
def test_a_plain_backward_reaches_only_the_free_parameters(name):
    """The score objectives' graph on a normalised model ends at the parametrization's free
    parameters (not at the power-iteration buffers, not at a copy of the data)."""
    torch.manual_seed(8)
    model = sn_model(power_steps=0).train()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    loss = make_objective(name)(model, x)
    ids = {id(p) for p in model.parameters()}
    assert all(id(leaf) in ids for leaf in accumulated_leaves(loss))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())

"""The paper's MNIST Glow (preset ``mnist-glow``) is the reference code's model and recipe; the
CPU-sized ``mnist-glow-small`` keeps the earlier 64-wide SiLU model. Small shapes, generated data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ebflow import glow_flow, make_objective
from ebflow.errors import ConfigError, InputError
from ebflow.experiment.config.builders import build_model
from ebflow.experiment.config.resolve import resolve_config
from ebflow.layers import ActNorm, AffineCoupling, ChannelScale, Conv1x1, cnn_conditioner
from ebflow.layers.split import _FirstPart

REFERENCE = dict(
    activation="leaky_relu", split_activation="relu", output_scale=True, alternate=False, train_actnorm=False
)


def _unwrap(layer: nn.Module) -> nn.Module:
    return layer.layer if isinstance(layer, _FirstPart) else layer


def _layers(model, kind: type) -> list:
    return [_unwrap(layer) for layer in model.layers if isinstance(_unwrap(layer), kind)]


def _couplings(model) -> tuple[list[AffineCoupling], list[AffineCoupling]]:
    """(the steps' couplings, the split priors' couplings): a split prior is the coupling that
    follows another coupling with no ActNorm between."""
    steps, splits, previous = [], [], None
    for layer in map(_unwrap, model.layers):
        if isinstance(layer, AffineCoupling):
            (splits if isinstance(previous, AffineCoupling) else steps).append(layer)
        if isinstance(layer, (AffineCoupling, ActNorm)):
            previous = layer
    return steps, splits


def _tiny_reference(hidden: int = 8, steps: int = 2) -> torch.nn.Module:
    model = glow_flow((1, 4, 4), levels=2, steps=steps, hidden=hidden, **REFERENCE).double()
    model.initialize(torch.randn(16, 1, 4, 4, dtype=torch.float64) * 2 + 0.5)
    return model


def _perturb(model, scale: float = 0.3) -> None:
    """Every parameter moved off its initial value (the zero convolutions, the output scales)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# -- the preset -------------------------------------------------------------------------------
def test_the_preset_resolves_to_the_reference_recipe():
    for loss, sigma in (("ssm", 0.1), ("dsm", 0.1)):
        c = resolve_config("mnist-glow", {"loss": loss})
        assert (
            c.optim.optimizer,
            c.optim.lr,
            c.optim.weight_decay,
            c.optim.grad_clip,
            c.optim.lr_decay,
            c.optim.ema_decay,
            c.optim.ema_warmup,
        ) == ("adam", 1e-5, 0.0, 500.0, 1.0, 0.999, True)
        assert (
            c.training.epochs,
            c.training.batch_size,
            c.data.val_size,
            c.objective.slices,
            c.objective.projection,
            c.objective.sigma,
        ) == (80, 100, 10000, 1, "rademacher", sigma)
        # the reference's lambda 0.1 on a loss that is not divided by D: 0.1 * 784 on ours
        assert c.objective.energy_reg == pytest.approx(0.1 * 784)
        assert (c.preprocessing.map, c.preprocessing.logit_smoothness, c.preprocessing.logit_shift) == (
            True,
            1.0,
            1e-6,
        )
        m = c.model
        assert (
            m.family,
            m.levels,
            m.steps,
            m.hidden,
            m.glow_activation,
            m.glow_split_activation,
            m.glow_output_scale,
            m.glow_alternate,
            m.glow_train_actnorm,
        ) == ("glow", 2, 16, 512, "leaky_relu", "relu", True, False, False)
    description = resolve_config("mnist-glow").runtime.description
    assert "weight decay 0" in description and "*.W" in description


def test_the_preset_builds_the_reference_conditioners():
    config = resolve_config("mnist-glow").updated(steps=2)
    model = build_model(config.model, (1, 8, 8), None, use_map=True)
    steps, splits = _couplings(model)
    assert len(steps) == 4 and len(splits) == 1
    for coupling, act in [(c, nn.LeakyReLU) for c in steps] + [(c, nn.ReLU) for c in splits]:
        assert not coupling.swap and coupling.scale_bound == 2.0
        first, act1, middle, act2, last, scale = coupling.conditioner
        c = coupling.event_shape[0]
        assert (first.in_channels, first.out_channels, first.kernel_size, first.padding) == (
            c // 2,
            512,
            (3, 3),
            (1, 1),
        )
        assert (middle.in_channels, middle.out_channels, middle.kernel_size) == (512, 512, (1, 1))
        assert (last.in_channels, last.out_channels, last.kernel_size, last.padding) == (
            512,
            c,
            (3, 3),
            (1, 1),
        )
        assert type(act1) is act and type(act2) is act
        if act is nn.LeakyReLU:
            assert act1.negative_slope == act2.negative_slope == 0.1
        assert not last.weight.any() and not last.bias.any()
        assert isinstance(scale, ChannelScale) and scale.factor == 3.0 and not scale.log_scale.any()
        assert all(p.requires_grad for p in coupling.parameters())
    actnorms = _layers(model, ActNorm)
    assert len(actnorms) == 4 and not any(p.requires_grad for a in actnorms for p in a.parameters())
    for conv in _layers(model, Conv1x1):  # plain (not LU) orthogonal 1x1 convolutions, no bias
        w = conv.weight.detach().double()
        assert conv.bias is None and conv.weight.requires_grad
        torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0], dtype=torch.float64), atol=1e-6, rtol=0)


def test_the_preset_model_has_the_reference_parameter_count():
    """10,040,968 trained parameters: the count of the reference's model.parameters() (its
    ActNorm parameters are not registered); the 384 ActNorm parameters here are frozen."""
    config = resolve_config("mnist-glow")
    model = build_model(config.model, (1, 28, 28), None, use_map=True)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 10_040_968
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == 2 * 16 * (4 + 8)


def test_the_small_variant_keeps_the_earlier_model():
    config = resolve_config("mnist-glow-small")
    assert config.runtime.description.startswith("NOT the paper's model")
    assert (
        config.model.hidden,
        config.model.glow_activation,
        config.model.glow_output_scale,
        config.model.glow_alternate,
        config.model.glow_train_actnorm,
    ) == (64, "silu", False, True, True)
    assert (config.optim.weight_decay, config.objective.energy_reg) == (0.0, pytest.approx(78.4))
    small = config.updated(steps=2)
    torch.manual_seed(0)
    built = build_model(small.model, (1, 8, 8), None, use_map=True).state_dict()
    torch.manual_seed(0)
    plain = glow_flow((1, 8, 8), levels=2, steps=2, hidden=64).state_dict()  # the defaults
    assert list(built) == list(plain) and all(torch.equal(built[k], plain[k]) for k in built)
    model = glow_flow((1, 8, 8), levels=2, steps=2, hidden=64)
    steps, _ = _couplings(model)
    assert [c.swap for c in steps] == [False, True, False, True]
    assert all(len(c.conditioner) == 5 and type(c.conditioner[1]).__name__ == "SiLU" for c in steps)


# -- the building blocks ----------------------------------------------------------------------
def test_channel_scale_multiplies_each_channel_by_exp_3s():
    scale = ChannelScale(3)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(scale(x), x)  # s = 0: scale 1
    with torch.no_grad():
        scale.log_scale.copy_(torch.tensor([0.1, -0.2, 0.3]))
    torch.testing.assert_close(scale(x), x * torch.exp(3 * scale.log_scale).view(1, 3, 1, 1))
    scale(x).sum().backward()
    assert scale.log_scale.grad is not None and scale.log_scale.grad.abs().min() > 0
    with pytest.raises(InputError, match="ChannelScale"):
        scale(torch.randn(2, 4, 4, 4))
    with pytest.raises(ConfigError):
        ChannelScale(0)
    with pytest.raises(ConfigError):
        ChannelScale(2, factor=0.0)


def test_cnn_conditioner_output_scale_option():
    plain = cnn_conditioner(2, 4, hidden=8)
    assert len(plain) == 5 and not isinstance(plain[-1], ChannelScale)  # the default is unchanged
    scaled = cnn_conditioner(2, 4, hidden=8, activation=lambda: nn.LeakyReLU(0.1), output_scale=True)
    assert isinstance(scaled[-1], ChannelScale) and isinstance(scaled[1], nn.LeakyReLU)
    x = torch.randn(3, 2, 5, 5)
    assert not scaled(x).any()  # zero last convolution: the coupling starts as the identity
    with torch.no_grad():
        scaled[4].bias.fill_(1.0)
        scaled[5].log_scale.fill_(0.5)
    torch.testing.assert_close(scaled(x), torch.full((3, 4, 5, 5), math.exp(1.5)))


def test_every_coupling_of_the_reference_model_starts_as_the_identity():
    model = _tiny_reference()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    steps, splits = _couplings(model)
    assert steps and splits
    for coupling in steps + splits:
        h = torch.randn(5, *coupling.event_shape, dtype=torch.float64)
        y, logdet = coupling(h)
        torch.testing.assert_close(y, h)
        assert not logdet.any()
    assert torch.isfinite(model.log_prob(x)).all()


def test_glow_options_are_validated_and_each_changes_the_model():
    with pytest.raises(ConfigError, match="conditioner activation"):
        glow_flow((1, 4, 4), levels=1, steps=1, hidden=4, activation="tanh")
    with pytest.raises(ConfigError, match="glow_activation"):
        resolve_config("mnist-glow", {"glow_activation": "tanh"})
    with pytest.raises(ConfigError, match="glow_split_activation"):
        resolve_config("mnist-glow", {"glow_split_activation": "gelu"})
    # split_activation defaults to activation
    default = glow_flow((1, 4, 4), levels=2, steps=1, hidden=4, activation="leaky_relu")
    assert all(isinstance(c.conditioner[1], nn.LeakyReLU) for level in _couplings(default) for c in level)
    relu = glow_flow((1, 4, 4), levels=2, steps=1, hidden=4, activation="leaky_relu", split_activation="relu")
    assert isinstance(_couplings(relu)[1][0].conditioner[1], nn.ReLU)
    # alternate: which half conditions
    fixed = glow_flow((1, 4, 4), levels=1, steps=3, hidden=4, alternate=False)
    assert [c.swap for c in _couplings(fixed)[0]] == [False, False, False]
    # output_scale off: no ChannelScale anywhere
    off = glow_flow((1, 4, 4), levels=2, steps=1, hidden=4, output_scale=False)
    assert not any(isinstance(m, ChannelScale) for m in off.modules())
    # the config keys reach the builder
    config = resolve_config(
        "mnist-glow",
        {
            "steps": 1,
            "hidden": 4,
            "glow_alternate": True,
            "glow_output_scale": False,
            "glow_train_actnorm": True,
            "glow_activation": "relu",
        },
    )
    model = build_model(config.model, (1, 4, 4), None, use_map=True)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, ChannelScale) for m in model.modules())
    assert isinstance(_couplings(model)[0][0].conditioner[1], nn.ReLU)
    two = build_model(config.updated(steps=2).model, (1, 4, 4), None, use_map=True)
    assert [c.swap for c in _couplings(two)[0]] == [False, True, False, True]


def test_frozen_actnorm_gets_no_gradient_and_keeps_its_data_initialisation():
    model = _tiny_reference()
    actnorms = _layers(model, ActNorm)
    before = [a.log_scale.detach().clone() for a in actnorms]
    assert any(b.abs().max() > 0.1 for b in before)  # fitted to the data
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    _perturb(model)  # in place, no autograd: the frozen parameters move too; reset them
    with torch.no_grad():
        for a, b in zip(actnorms, before, strict=True):
            a.log_scale.copy_(b)
    make_objective("ssm")(model, x).backward()
    assert all(p.grad is None for a in actnorms for p in a.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trained)


# -- exactness and the objectives ---------------------------------------------------------
def test_exact_log_likelihood_equals_the_change_of_variables_by_brute_force():
    model = _tiny_reference()
    _perturb(model)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    d = 16
    expected = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(
            lambda v: model(v.view(1, 1, 4, 4)).reshape(-1), xi.reshape(-1)
        )
        z = model(xi.view(1, 1, 4, 4)).reshape(-1)
        log_normal = -0.5 * z.pow(2).sum() - 0.5 * d * math.log(2 * math.pi)
        expected.append(log_normal + torch.linalg.slogdet(jac.reshape(d, d))[1])
    torch.testing.assert_close(model.log_prob(x), torch.stack(expected).detach(), rtol=1e-9, atol=1e-9)


def test_ssm_and_dsm_with_leaky_relu_conditioners_equal_their_definitions():
    """LeakyReLU is piecewise linear: its second derivative is 0 almost everywhere, the energy's
    Hessian is still defined there (tanh of the log-scale, the Gaussians), and the losses equal
    their direct double-autograd definitions; lambda*D here is the reference's lambda."""
    model = _tiny_reference()
    _perturb(model)
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    d, lam = 16, 0.1
    ssm = make_objective("ssm", energy_reg=lam * d)
    v = ssm.draw_noise(
        tuple(x.shape), dtype=x.dtype, device=x.device, generator=torch.Generator().manual_seed(1)
    )
    xg = x.clone().requires_grad_(True)
    e = model.energy(xg)
    score = -torch.autograd.grad(e.sum(), xg, create_graph=True)[0]
    hv = torch.autograd.grad((score * v[0]).sum(), xg, create_graph=True)[0]
    per_example = (v[0] * hv).flatten(1).sum(1) + 0.5 * score.pow(2).flatten(1).sum(1)
    expected = per_example.mean() / d + lam * e.mean()  # the reference's loss on (B, 1, H, W) batches
    loss = ssm(model, x, noise=v)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-9)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    sigma = 0.1
    dsm = make_objective("dsm", sigma=sigma)
    noise = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(2))
    xp = (x + sigma * noise).requires_grad_(True)
    s = -torch.autograd.grad(model.energy(xp).sum(), xp)[0]
    direct = (0.5 * (s + noise / sigma).pow(2).flatten(1).sum(1)).mean() / d
    torch.testing.assert_close(dsm(model, x, noise=noise), direct, rtol=1e-9, atol=1e-9)

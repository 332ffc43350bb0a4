"""The toy2d and mm10 presets follow the reference code's toy_examples (chen-hao-chao/ebflow):
its data generators, models, priors and per-objective training recipes."""

from __future__ import annotations

import math

import pytest
import torch

from ebflow import Laplace, StandardNormal
from ebflow.architectures import coupling_flow, dense_flow
from ebflow.errors import ConfigError
from ebflow.experiment.config.builders import build_model, build_optimizer
from ebflow.experiment.config.resolve import resolve_config
from ebflow.experiment.data.datasets import load_data
from ebflow.experiment.data.toys import mm10_sample, toy2d_base_points
from ebflow.experiment.training.loop import Trainer
from ebflow.layers import ActNorm, Dense, LearnableSwish, ShiftScaleCoupling, random_orthogonal
from ebflow.objectives import ml_loss, ssm_loss

SMALL_TOY = {
    "toy_train_size": 400,
    "toy_points": 300,
    "toy_eval_size": 300,
    "blocks": 2,
    "hidden": 8,
    "batch_size": 64,
    "max_iters": 2,
    "tensorboard": False,
    "progress": False,
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- data -------------------------------------------------------------------------------------
def test_sine_points_are_4_sin_3x_over_4_plus_unit_noise_on_minus_8_to_8():
    p = toy2d_base_points("sine", 40000, _gen())
    x, y = p[:, 0], p[:, 1]
    assert float(x.min()) >= -8 and float(x.max()) <= 8 and float(x.min()) < -7.9 and float(x.max()) > 7.9
    r = y - 4 * torch.sin(0.75 * x)
    assert abs(float(r.mean())) < 0.03 and abs(float(r.std()) - 1.0) < 0.02


def test_swirl_is_a_540_degree_spiral_of_radius_about_7_9():
    p = toy2d_base_points("swirl", 40000, _gen())
    # p * 6/5 = (n cos n, -n sin n) + offset, offset in [0.5, 1] x [1.5, 2], n = 3 pi sqrt(v)
    q = p * 1.2 - torch.tensor([0.75, 1.75], dtype=torch.float64)
    n = q.norm(dim=1)
    assert abs(float(n.max()) - 3 * math.pi) < 0.4 and float(n.min()) < 0.4
    assert abs(float(p.norm(dim=1).max()) - 7.9) < 0.6
    # n^2 / (3 pi)^2 is uniform: half the points within n = 3 pi / sqrt(2)
    assert abs(float((n < 3 * math.pi / math.sqrt(2)).double().mean()) - 0.5) < 0.03


def test_checkerboard_fills_8_squares_of_side_3_on_minus_6_to_6():
    p = toy2d_base_points("checkerboard", 40000, _gen())
    assert float(p.abs().max()) <= 6
    cell = torch.floor(p / 3).long()
    assert bool(((cell[:, 0] + cell[:, 1]) % 2 == 0).all())  # the dark squares only
    counts = torch.unique(cell, dim=0, return_counts=True)[1]
    assert len(counts) == 8 and float(counts.min()) > 0.9 * 40000 / 8


def test_mm10_is_the_tanh_autoregressive_process():
    y = mm10_sample(500, _gen(3))
    z = torch.randn(500, 10, generator=_gen(3), dtype=torch.float64)
    assert torch.equal(y[:, 0], z[:, 0])
    for i in range(1, 10):
        torch.testing.assert_close(y[:, i], torch.tanh(5 * z[:, i]) * (y[:, i - 1] + 2 * 2**i))


def test_toy_training_points_are_clean_and_evaluation_density_is_the_test_base_points():
    splits = load_data(resolve_config("toy2d-checkerboard", SMALL_TOY).data)
    cell = torch.floor(splits.train / 3).long()
    assert bool(((cell[:, 0] + cell[:, 1]) % 2 == 0).all())  # clean: never smoothed off a square
    assert splits.train_noise == 0.375 and splits.mixture is not None
    assert splits.mixture.centres.shape == (300, 2) and splits.mixture.noise == 0.375
    # test = every evaluation centre once plus N(0, 0.375^2); val: another noise draw
    r = splits.test - splits.mixture.centres
    assert abs(float(r.std()) - 0.375) < 0.03
    assert not torch.equal(splits.val, splits.test)


def _trainer(tmp_path, preset: str, **overrides) -> Trainer:
    config = resolve_config(preset, {**SMALL_TOY, **overrides})
    return Trainer(config, tmp_path, device=torch.device("cpu"))


def test_fresh_smoothing_noise_every_step(tmp_path):
    t = _trainer(tmp_path, "toy2d-sine", loss="ssm")
    xb = t.train_data[:64]
    first, _ = t._step_inputs(xb)
    t.counters.step += 1
    second, _ = t._step_inputs(xb)
    assert not torch.equal(first, second)
    noise = torch.cat([first - xb, second - xb])
    assert abs(float(noise.std()) - 0.375) < 0.03


def test_dsm_with_sigma_equal_to_the_smoothing_perturbs_clean_points_once(tmp_path):
    t = _trainer(tmp_path, "toy2d-sine", loss="dsm")
    assert t.config.objective.sigma == 0.375 and t.smoothing_std() == 0.0
    xb = t.train_data[:64]
    inp, noise = t._step_inputs(xb)
    assert torch.equal(inp, xb) and noise is not None  # DSM's x + 0.375 eps is the smoothing
    half = _trainer(tmp_path / "b", "toy2d-sine", loss="dsm", sigma=0.3)
    assert half.smoothing_std() == pytest.approx(math.sqrt(0.375**2 - 0.3**2))
    with pytest.raises(ConfigError, match="toy_noise"):
        resolve_config("toy2d-sine", {"loss": "dsm", "sigma": 0.5})


# -- model ------------------------------------------------------------------------------------
def test_separate_conditioners_have_3_hidden_layers_and_the_reference_coupling_form():
    torch.manual_seed(0)
    layer = ShiftScaleCoupling(2, condition_on_odd=True, hidden=64, depth=3, shift_activation="elu")
    linear = [m for m in layer.scale_net if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linear] == [(64, 1), (64, 64), (64, 64), (1, 64)]
    assert sum(isinstance(m, LearnableSwish) for m in layer.scale_net) == 3
    assert sum(isinstance(m, torch.nn.ELU) for m in layer.shift_net) == 3
    assert layer.scale_net[0] is not layer.shift_net[0]
    eye = torch.eye(64)
    torch.testing.assert_close(linear[1].weight @ linear[1].weight.T, eye, atol=1e-5, rtol=0)  # orthogonal
    x = torch.randn(5, 2, dtype=torch.float64)
    layer = layer.double()
    y, log_det = layer(x)
    s, t = layer.scale_net(x[:, 1:]), layer.shift_net(x[:, 1:])
    torch.testing.assert_close(y[:, 1], x[:, 1])  # conditions on the odd coordinate
    torch.testing.assert_close(y[:, :1], (x[:, :1] - t) * torch.exp(-s))  # unbounded scale
    torch.testing.assert_close(log_det, -s.sum(1))
    torch.testing.assert_close(layer.inverse(y), x)


def test_learnable_swish_is_twice_differentiable_and_its_beta_trains():
    swish = LearnableSwish(3).double()
    with torch.no_grad():
        swish.beta.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(swish(x), x * torch.sigmoid(swish.beta * x))
    assert torch.autograd.gradgradcheck(lambda v: swish(v), (x,))
    model = coupling_flow(2, blocks=2, hidden=8, depth=3, conditioner="separate").double()
    model.initialize(torch.randn(50, 2, dtype=torch.float64))
    ssm_loss(model, torch.randn(16, 2, dtype=torch.float64)).loss.mean().backward()
    betas = [m.beta.grad for m in model.modules() if isinstance(m, LearnableSwish)]
    assert betas and all(g is not None and bool(g.abs().sum() > 0) for g in betas)


def test_separate_coupling_flow_is_exact_and_its_dense_biases_start_as_torch_linear():
    torch.manual_seed(1)
    model = coupling_flow(
        2, blocks=3, hidden=8, depth=3, conditioner="separate", shift_activation="elu"
    ).double()
    model.initialize(torch.randn(100, 2, dtype=torch.float64))
    x = torch.randn(7, 2, dtype=torch.float64)
    _, log_det = model.forward_with_log_det(x)
    torch.testing.assert_close(model.log_prob(x), model.prior.log_prob(model(x)) + log_det)
    torch.testing.assert_close(model.inverse(model(x)), x)
    biases = torch.cat([l.bias for l in model.layers if isinstance(l, Dense)])
    assert bool((biases.abs() <= 1 / math.sqrt(2)).all()) and bool(biases.abs().sum() > 0)
    assert isinstance(model.layers[1], ShiftScaleCoupling) and model.layers[1].condition_on_odd
    assert not model.layers[4].condition_on_odd


def test_weight_norm_reparameterises_the_dense_layers_and_stays_exact():
    torch.manual_seed(2)
    model = coupling_flow(2, blocks=2, hidden=8, depth=3, conditioner="separate", weight_norm=True).double()
    model.initialize(torch.randn(100, 2, dtype=torch.float64))
    dense = model.layers[0]
    g = dense.parametrizations.weight.original0
    x = torch.randn(6, 2, dtype=torch.float64)
    before = model.log_prob(x)
    with torch.no_grad():
        g.mul_(2.0)  # doubling every row's norm doubles W: log|det W| grows by 2 log 2
    torch.testing.assert_close(dense.matrix().norm(dim=1), g.flatten().abs())
    _, log_det = model.forward_with_log_det(x)
    torch.testing.assert_close(model.log_prob(x), model.prior.log_prob(model(x)) + log_det)
    assert not torch.allclose(model.log_prob(x), before)


def test_laplace_prior_density_sampling_and_ml():
    prior = Laplace()
    z = torch.randn(10, 3, dtype=torch.float64)
    ref = torch.distributions.Laplace(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(prior.log_prob(z), ref)
    s = prior.sample((20000, 2), dtype=torch.float64, device=torch.device("cpu"), generator=_gen())
    assert abs(float(s.abs().mean()) - 1.0) < 0.03 and abs(float(s.mean())) < 0.03
    assert torch.equal(
        s, prior.sample((20000, 2), dtype=torch.float64, device=torch.device("cpu"), generator=_gen())
    )
    with pytest.raises(ConfigError):
        Laplace(0.0)
    model = dense_flow((3,), num_layers=2, bias=False, prior=Laplace()).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    z, log_det = model.forward_with_log_det(x)
    torch.testing.assert_close(ml_loss(model, x).loss, -(ref.new_tensor(0) + prior.log_prob(z) + log_det))


def test_prior_key_builds_the_laplace_prior_and_rejects_sml():
    ml = resolve_config("toy2d-sine", {**SMALL_TOY, "loss": "ml"})
    ssm = resolve_config("toy2d-sine", {**SMALL_TOY, "loss": "ssm"})
    assert isinstance(build_model(ml.model, (2,), None, use_map=True).prior, Laplace)
    assert isinstance(build_model(ssm.model, (2,), None, use_map=True).prior, StandardNormal)
    with pytest.raises(ConfigError, match="prior"):
        build_model(resolve_config("mnist-cnn", {"prior": "laplace"}).model, (1, 28, 28), None, use_map=True)


def test_adamw_decays_the_weights_decoupled_and_equals_adam_without_decay():
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.zeros(3)
    opt = build_optimizer(resolve_config("toy2d-checkerboard", {"weight_decay": 0.1, "lr": 0.5}).optim, [w])
    assert isinstance(opt, torch.optim.AdamW)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3,), 1 - 0.5 * 0.1))  # zero gradient: decay only
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    for p in (a, b):
        p.grad = torch.tensor([0.3, -1.0, 2.0])
    torch.optim.Adam([a], lr=0.1).step()
    build_optimizer(resolve_config("toy2d-checkerboard", {"lr": 0.1}).optim, [b]).step()
    torch.testing.assert_close(a, b)


# -- mm10 model -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset,param",
    [("mm10-full", "full"), ("mm10-tril", "triu"), ("mm10-triu", "tril"), ("mm10-lu", "triangular_pair")],
)
def test_mm10_models_are_bias_free_with_laplace_prior_and_reference_matrices(preset, param):
    c = resolve_config(preset)
    assert c.model.parameterization == param
    torch.manual_seed(0)
    model = build_model(c.model, (10,), None, use_map=True)
    dense = [l for l in model.layers if isinstance(l, Dense)]
    assert len(dense) == (22 if param == "triangular_pair" else 11)
    assert all(l.bias is None for l in dense) and isinstance(model.prior, Laplace)
    assert model.dtype == torch.float64
    w = dense[0].matrix()
    if param == "triangular_pair":
        assert torch.equal(w, torch.tril(w)) and torch.equal(
            dense[1].matrix(), torch.triu(torch.ones(10, 10)).double()
        )
    elif param in ("tril", "triu"):
        tri = torch.tril if param == "tril" else torch.triu
        assert torch.equal(w, tri(w)) and not torch.equal(w, torch.eye(10, dtype=w.dtype))
    model.initialize(mm10_sample(300, _gen()))
    x = mm10_sample(5, _gen(1))
    z, log_det = model.forward_with_log_det(x)
    torch.testing.assert_close(model.log_prob(x), model.prior.log_prob(z) + log_det)


def test_orthogonal_init_of_a_triangular_dense_layer_is_the_triangle_of_an_orthogonal_matrix():
    torch.manual_seed(5)
    layer = Dense(6, parameterization="tril", init="orthogonal")
    torch.manual_seed(5)
    torch.testing.assert_close(layer.weight.detach(), torch.tril(random_orthogonal(6)))
    with pytest.raises(ConfigError, match="dense"):
        build_model(
            resolve_config("mnist-cnn", {"weight_init": "orthogonal"}).model, (1, 28, 28), None, use_map=True
        )


# -- the recipes ----------------------------------------------------------------------------------
# (optimizer, lr, clip on our per-dimension SM scale = reference / 2, shift activation, prior, weight norm)
TOY_RECIPES = {
    "toy2d-sine": {
        "ml": ("adam", 5e-4, 1.0, "swish", "laplace", False),
        "sml": ("adamw", 5e-4, None, "swish", "normal", False),
        "ssm": ("adam", 1e-4, 0.5, "swish", "normal", False),
        "dsm": ("adam", 1e-4, 0.5, "elu", "normal", False),
        "fdssm": ("adam", 1e-4, 0.5, "swish", "normal", False),
    },
    "toy2d-swirl": {
        "ml": ("adam", 5e-3, 1.0, "elu", "laplace", False),
        "sml": ("adam", 1e-4, 10.0, "elu", "normal", False),
        "ssm": ("adam", 1e-4, 5.0, "swish", "normal", False),
        "dsm": ("adam", 1e-4, 5.0, "elu", "normal", False),
        "fdssm": ("adam", 1e-4, 1.25, "elu", "normal", False),
    },
    "toy2d-checkerboard": {
        "ml": ("adamw", 1e-4, 10.0, "elu", "laplace", False),
        "sml": ("adamw", 1e-4, 10.0, "elu", "normal", False),
        "ssm": ("adamw", 1e-4, 5.0, "swish", "normal", False),
        "dsm": ("adamw", 1e-4, 5.0, "elu", "normal", False),
        "fdssm": ("adam", 1e-4, 5.0, "elu", "normal", True),
    },
}


@pytest.mark.parametrize("preset", sorted(TOY_RECIPES))
def test_toy_presets_follow_the_reference_configs(preset):
    for loss, expected in TOY_RECIPES[preset].items():
        c = resolve_config(preset, {"loss": loss})
        got = (
            c.optim.optimizer,
            c.optim.lr,
            c.optim.grad_clip,
            c.model.shift_activation,
            c.model.prior,
            c.model.weight_norm,
        )
        assert got == expected, (preset, loss)
        assert (
            c.model.family,
            c.model.conditioner,
            c.model.blocks,
            c.model.hidden,
            c.model.depth,
            c.model.dtype,
            c.model.actnorm_scale,
        ) == ("coupling", "separate", 10, 64, 3, "float64", "linear")
        assert (
            c.objective.sigma,
            c.objective.eps,
            c.data.toy_noise,
            c.optim.weight_decay,
            c.optim.ema_decay,
            c.optim.ema_warmup,
        ) == (0.375, 0.1, 0.375, 0.0, 0.999, True)
        assert (c.data.toy_train_size, c.data.toy_points, c.data.toy_eval_size) == (50000, 10000, 10000)
        big = preset == "toy2d-checkerboard"
        assert (c.training.batch_size, c.training.max_iters) == ((10000, 100001) if big else (2048, 50001))


@pytest.mark.parametrize("preset", ["mm10-full", "mm10-tril", "mm10-triu", "mm10-lu"])
def test_mm10_presets_follow_the_reference_configs(preset):
    c = resolve_config(preset)
    assert (
        c.objective.loss,
        c.optim.optimizer,
        c.optim.lr,
        c.optim.grad_clip,
        c.optim.ema_decay,
        c.training.batch_size,
        c.training.max_iters,
    ) == ("ml", "adam", 1e-3, 500.0, 0.0, 2048, 10001)
    assert (
        c.model.num_layers,
        c.model.bias,
        c.model.prior,
        c.model.actnorm,
        c.model.alpha,
        c.model.weight_init,
        c.model.dtype,
    ) == (11, False, "laplace", True, 0.3, "orthogonal", "float64")
    assert (c.data.toy_train_size, c.data.toy_eval_size) == (50000, 10000)


def test_coupling_keys_reach_the_model():
    def build(**over):
        c = resolve_config("toy2d-swirl", {**SMALL_TOY, **over})
        return build_model(c.model, (2,), None, use_map=True)

    elu = build(shift_activation="elu", weight_norm=True)
    couplings = [l for l in elu.layers if isinstance(l, ShiftScaleCoupling)]
    assert len(couplings) == 2 and all(
        isinstance(m, torch.nn.ELU)
        for c in couplings
        for m in c.shift_net
        if not isinstance(m, torch.nn.Linear)
    )
    assert all(
        torch.nn.utils.parametrize.is_parametrized(l, "weight") for l in elu.layers if isinstance(l, Dense)
    )
    swish = build(shift_activation="swish", weight_norm=False)
    assert all(
        isinstance(m, LearnableSwish)
        for l in swish.layers
        if isinstance(l, ShiftScaleCoupling)
        for m in l.shift_net
        if not isinstance(m, torch.nn.Linear)
    )
    assert not any(torch.nn.utils.parametrize.is_parametrized(l) for l in swish.layers)
    joint = build(conditioner="joint")
    assert not any(isinstance(l, ShiftScaleCoupling) for l in joint.layers)
    for scale in ("log", "linear"):
        norms = [l for l in build(actnorm_scale=scale).layers if isinstance(l, ActNorm)]
        assert len(norms) == 2 and all(n.scale_parameterization == scale for n in norms)


def test_linear_actnorm_is_the_same_map_with_other_optimiser_steps():
    """Fails when ``scale="linear"`` learns the log-scale after all (its Adam step would move
    ``log a`` by the learning rate instead of ``a``), or when its map, inverse or log|det| differ
    from the log-scale layer's at the same initialisation."""
    x = torch.randn(64, 3, dtype=torch.float64) * torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64) + 1.0
    log, linear = ActNorm(3).double(), ActNorm(3, scale="linear").double()
    for layer in (log, linear):
        layer.initialize(x)
    torch.testing.assert_close(linear.scale, log.log_scale.exp())
    (y_log, ld_log), (y_lin, ld_lin) = log(x), linear(x)
    torch.testing.assert_close(y_lin, y_log)
    torch.testing.assert_close(ld_lin, ld_log)
    torch.testing.assert_close(linear.inverse(y_lin), x)
    assert {n for n, _ in linear.named_parameters()} == {"shift", "scale"}
    before = linear.scale.detach().clone()
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2)
    linear(x)[0].pow(2).sum().backward()  # shrinks every scale
    optimizer.step()  # Adam's first step moves each parameter by the learning rate
    torch.testing.assert_close(before - linear.scale.detach(), torch.full((3,), 1e-2, dtype=torch.float64))
    with pytest.raises(ConfigError, match="unknown ActNorm scale 'exp'; choose log or linear"):
        ActNorm(3, scale="exp")


def test_sml_maps_its_standard_normal_draws_to_the_laplace_prior():
    n = torch.randn(40000, dtype=torch.float64, generator=_gen())
    z = Laplace(2.0).from_standard_normal(n)
    assert abs(float(z.abs().mean()) - 2.0) < 0.05 and bool((torch.sign(z) == torch.sign(n)).all())
    torch.testing.assert_close(
        torch.distributions.Laplace(0.0, 2.0).cdf(z), torch.distributions.Normal(0.0, 1.0).cdf(n)
    )
    torch.manual_seed(0)
    model = dense_flow((3,), num_layers=2, prior=Laplace()).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    noise = torch.randn(4, 3, dtype=torch.float64)
    from ebflow.objectives import sml_loss

    loss = sml_loss(model, x, noise=noise).loss
    samples = model.inverse(Laplace().from_standard_normal(noise))
    torch.testing.assert_close(loss, model.energy(x) - model.energy(samples).mean())

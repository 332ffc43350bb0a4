"""Correctness of the training objectives: gradients, estimator agreement, consistency, and that
score matching never touches a linear layer's determinant, inverse or factorisation."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import image_model_1ch, initialised, perturb
from ebflow import EBFlow, glow_flow, make_objective
from ebflow.errors import ConfigError
from ebflow.layers import (
    ActNorm,
    AffineCoupling,
    Conv1x1,
    Conv2d,
    Dense,
    FixedAffine,
    Flatten,
    LinearFlowLayer,
    ResidualSmoothLeakyReLU,
    SmoothLeakyReLU,
    Squeeze,
)
from ebflow.objectives import dsm_loss, esm_loss, fdssm_loss, sml_loss, ssm_loss
from ebflow.objectives.losses import _fdssm_per_example
from helpers import accumulated_leaves, spy_on_linear_algebra


def tiny_model() -> EBFlow:
    layers = [
        Dense(3),
        SmoothLeakyReLU(0.3),
        ActNorm(3),
        Dense(3, parameterization="lu"),
        AffineCoupling((3,), hidden=4, depth=1),
    ]
    return EBFlow(layers, (3,)).double()


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _finite_difference_check(model, loss_of_model, seed=0, h=1e-6, entries=6):
    """Compare autograd parameter gradients with central differences on a few entries each."""
    torch.manual_seed(seed)
    model.zero_grad()
    loss_of_model().backward()
    for p in _params(model):
        grad = p.grad.detach().clone().reshape(-1)
        flat = p.detach().view(-1)  # shares the version counter, so caches see the change
        idx = torch.randperm(flat.numel())[:entries]
        for i in idx.tolist():
            old = flat[i].item()
            with torch.no_grad():
                flat[i] = old + h
                torch.manual_seed(seed)
                up = loss_of_model().item()
                flat[i] = old - h
                torch.manual_seed(seed)
                down = loss_of_model().item()
                flat[i] = old
            numeric = (up - down) / (2 * h)
            assert abs(numeric - grad[i].item()) <= 1e-5 * (1 + abs(numeric)), (
                p.shape,
                i,
                numeric,
                grad[i].item(),
            )


@pytest.mark.parametrize(
    "name, options",
    [
        ("ml", {}),
        ("ssm", {"slices": 2}),
        ("ssm", {"projection": "gaussian"}),
        ("dsm", {"sigma": 0.3}),
        ("fdssm", {"eps": 0.1}),
        ("esm", {}),
        ("dsm", {"sigma": 0.3, "energy_reg": 0.1}),
        ("esm", {"energy_reg": 0.1}),
    ],
)
def test_parameter_gradients_match_finite_differences(name, options):
    x = torch.randn(8, 3, dtype=torch.float64)
    model = initialised(tiny_model(), x)
    objective = make_objective(name, **options)
    _finite_difference_check(model, lambda: objective(model, x))


def test_sml_gradient_is_energy_difference_with_samples_held_fixed():
    x = torch.randn(8, 3, dtype=torch.float64)
    model = initialised(tiny_model(), x)
    objective = make_objective("sml", num_samples=16)
    torch.manual_seed(5)
    model.zero_grad()
    objective(model, x).backward()
    auto = [p.grad.clone() for p in _params(model)]
    torch.manual_seed(5)
    samples = model.sample(16)
    model.zero_grad()
    (model.energy(x).mean() - model.energy(samples).mean()).backward()
    for a, p in zip(auto, _params(model), strict=True):
        torch.testing.assert_close(a, p.grad)
    _finite_difference_check(model, lambda: model.energy(x).mean() - model.energy(samples).mean())


def test_sml_gradient_matches_ml_gradient_in_expectation():
    model = perturb(EBFlow([Dense(2)], (2,)).double(), 0.3)
    x = torch.randn(64, 2, dtype=torch.float64) * 1.5 + 0.5
    model.zero_grad()
    make_objective("ml")(model, x).backward()
    ml = [p.grad.clone() for p in _params(model)]
    model.zero_grad()
    make_objective("sml", num_samples=400_000)(model, x).backward()
    for g_ml, p in zip(ml, _params(model), strict=True):
        torch.testing.assert_close(p.grad, g_ml, atol=0.02 * (1 + float(g_ml.abs().max())), rtol=0)


def _hessian_parts(model, x, u):
    """Per example: grad E, u^T H u (exact, autograd)."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model.energy(x).sum(), x, create_graph=True)
    (hu,) = torch.autograd.grad((g * u).sum(), x)
    return g.detach(), (hu * u).sum(dim=1)


def test_ssm_with_many_slices_approaches_esm():
    x = torch.randn(6, 3, dtype=torch.float64)
    model = initialised(tiny_model(), x, scale=0.5)
    exact = esm_loss(model, x)[0].mean().item()
    for projection in ("rademacher", "gaussian"):
        torch.manual_seed(0)
        estimate = ssm_loss(model, x, slices=20_000, projection=projection)[0].mean().item()
        assert abs(estimate - exact) < 0.01 * (1 + abs(exact)), (projection, estimate, exact)


def test_fdssm_converges_to_sliced_score_matching_as_eps_shrinks():
    x = torch.randn(5, 3, dtype=torch.float64)
    model = initialised(tiny_model(), x, scale=0.5)
    u = torch.randn(5, 3, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    g, uhu = _hessian_parts(model, x, u)
    sliced = 0.5 * (g * u).sum(1) ** 2 - uhu  # the same slice, exact derivatives (per dimension: |u| = 1)
    errors = []
    for eps in (1e-1, 1e-2, 1e-3):
        with torch.no_grad():
            terms = _fdssm_per_example(model, x, eps * u).loss
        errors.append(float((terms - sliced).abs().max()))
    assert errors[2] < 1e-4 * (1 + float(sliced.abs().max()))
    assert errors[0] > errors[1] > errors[2]
    # ... and in expectation over directions on the sphere it estimates the SSM / ESM objective.
    exact = esm_loss(model, x)[0].mean().item()
    torch.manual_seed(0)
    big = x.repeat(40_000, 1)
    with torch.no_grad():
        estimate = fdssm_loss(model, big, eps=1e-3)[0].mean().item()
    assert abs(estimate - exact) < 0.02 * (1 + abs(exact)), (estimate, exact)


@pytest.mark.parametrize(
    "name, options", [("ssm", {"slices": 4}), ("dsm", {"sigma": 0.05}), ("fdssm", {"eps": 0.05})]
)
def test_gaussian_model_recovers_data_covariance(name, options):
    """A single dense layer with bias is a Gaussian model; score matching is consistent."""
    gen = torch.Generator().manual_seed(42)
    true_cov = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]], dtype=torch.float64)
    data = torch.randn(4000, 3, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(true_cov).T
    data = data + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    sample_cov = torch.cov(data.T, correction=0)
    model = EBFlow([Dense(3)], (3,)).double()
    objective = make_objective(name, **options)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=800)
    torch.manual_seed(0)
    for _ in range(800):
        optimiser.zero_grad()
        objective(model, data).backward()
        optimiser.step()
        scheduler.step()
    w = model.layers[0].matrix().detach()
    model_cov = torch.linalg.inv(w.T @ w)
    rel = float(torch.linalg.matrix_norm(model_cov - sample_cov) / torch.linalg.matrix_norm(sample_cov))
    print(name, "relative covariance error", rel)
    assert rel < 0.05, rel


@pytest.fixture
def forbid_linear_algebra(monkeypatch):
    """``activate()`` makes every determinant / inverse / factorisation routine raise when
    called (after the models are built: their initialisation may factorise matrices)."""
    classes = (LinearFlowLayer, Dense, Conv2d, Conv1x1, ActNorm, FixedAffine, Flatten, Squeeze)
    methods = ("log_abs_det", "_log_abs_det", "_factorize", "inverse", "_inverse_with")
    return lambda: spy_on_linear_algebra(monkeypatch, classes, methods)


def every_linear_layer_model() -> EBFlow:
    layers = [
        FixedAffine(2.0, 0.1),
        Conv2d(1, 3),
        ResidualSmoothLeakyReLU(0.3),
        Squeeze(),
        Conv1x1(4),
        ActNorm(4),
        Flatten((4, 2, 2)),
        Dense(16, parameterization="full"),
        SmoothLeakyReLU(0.3),
        Dense(16, parameterization="tril"),
        Dense(16, parameterization="triu"),
        Dense(16, parameterization="lu"),
    ]
    return EBFlow(layers, (1, 4, 4)).double()


@pytest.mark.parametrize(
    "name, options",
    [
        ("ssm", {}),
        ("dsm", {"sigma": 0.1}),
        ("fdssm", {"eps": 0.1}),
        ("esm", {}),
        ("dsm", {"sigma": 0.1, "energy_reg": 0.01}),
    ],
)
def test_score_matching_never_calls_linear_algebra_of_linear_layers(name, options, forbid_linear_algebra):
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    models = (every_linear_layer_model().initialize(x), image_model_1ch().initialize(x))
    objective = make_objective(name, **options)
    calls = forbid_linear_algebra()
    for model in models:
        loss = objective(model, x)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert calls == []


def test_the_spy_catches_maximum_likelihood(forbid_linear_algebra):
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    model = every_linear_layer_model().initialize(x)
    calls = forbid_linear_algebra()
    with pytest.raises(AssertionError):
        make_objective("ml")(model, x)
    assert calls


def test_objective_configuration_errors():
    with pytest.raises(ConfigError, match="unknown objective 'foo'"):
        make_objective("foo")
    with pytest.raises(ConfigError, match="sigma"):
        make_objective("dsm", sigma=-1.0)
    with pytest.raises(ConfigError, match="eps"):
        make_objective("fdssm", eps=0.0)
    with pytest.raises(ConfigError, match="slices"):
        make_objective("ssm", slices=0)
    with pytest.raises(ConfigError, match="takes no option"):
        make_objective("ml", sigma=1.0)
    with pytest.raises(ConfigError, match="energy_reg"):
        make_objective("dsm", energy_reg=-1.0)
    with pytest.raises(ConfigError, match="projection"):
        make_objective("ssm", projection="uniform")(tiny_model(), torch.randn(2, 3, dtype=torch.float64))


def test_ml_loss_is_mean_negative_log_likelihood():
    x = torch.randn(8, 3, dtype=torch.float64)
    model = initialised(tiny_model(), x)
    torch.testing.assert_close(make_objective("ml")(model, x), -model.log_prob(x).mean())


@pytest.mark.parametrize(
    "name, options", [("ssm", {"slices": 3}), ("dsm", {"sigma": 0.2}), ("fdssm", {"eps": 0.1})]
)
def test_drawn_noise_makes_the_loss_shardable(name, options):
    """The loss of a batch equals the mean of the losses of its halves given the same noise."""
    x = torch.randn(8, 3, dtype=torch.float64)
    model = initialised(tiny_model(), x)
    objective = make_objective(name, **options)
    noise = objective.draw_noise(
        tuple(x.shape), dtype=x.dtype, device=x.device, generator=torch.Generator().manual_seed(3)
    )
    dim = objective.noise_batch_dim
    full = objective(model, x, noise=noise)
    halves = [objective(model, x[i : i + 4], noise=noise.narrow(dim, i, 4)) for i in (0, 4)]
    torch.testing.assert_close(full, (halves[0] + halves[1]) / 2)
    again = objective(model, x, noise=noise)
    torch.testing.assert_close(full, again)
    with pytest.raises(ConfigError, match="must have shape"):
        objective(model, x[:4], noise=noise)
    assert make_objective("ml").draw_noise((4, 3), dtype=x.dtype, device=x.device) is None
    with pytest.raises(ConfigError, match="takes no noise"):
        make_objective("ml")(model, x, noise=noise)


@pytest.mark.parametrize(
    "name, options", [("ml", {}), ("ssm", {}), ("dsm", {"sigma": 0.3}), ("fdssm", {"eps": 0.1})]
)
def test_parameter_gradients_of_a_convolutional_model_match_finite_differences(name, options):
    """Convolutions, squeeze, 1x1 conv, ActNorm and a CNN coupling, in float64."""
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    model = initialised(image_model_1ch(), x, scale=0.1)
    objective = make_objective(name, **options)
    _finite_difference_check(model, lambda: objective(model, x), entries=3)


# -- SML's latent noise ------------------------------------------------------------------------------
def test_sml_draws_its_latent_noise_like_the_other_objectives():
    x = torch.randn(8, 3, dtype=torch.float64)
    model = initialised(tiny_model(), x)
    objective = make_objective("sml", num_samples=16)
    assert objective.noise_batch_dim == 0
    noise = objective.draw_noise(
        tuple(x.shape), dtype=x.dtype, device=x.device, generator=torch.Generator().manual_seed(7)
    )
    assert noise.shape == (16, 3)
    # the same numbers as the model's own sampler with the same generator
    samples = model.sample(16, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(model.inverse(noise), samples, atol=0, rtol=0)
    expected = (model.energy(x) - model.energy(samples).mean()).mean()
    torch.testing.assert_close(objective(model, x, noise=noise), expected)
    # the gradient holds the samples fixed
    model.zero_grad()
    objective(model, x, noise=noise).backward()
    auto = [p.grad.clone() for p in _params(model)]
    model.zero_grad()
    expected.backward()
    for a, p in zip(auto, _params(model), strict=True):
        torch.testing.assert_close(a, p.grad)
    # without num_samples: one latent draw per example of the batch
    assert make_objective("sml").draw_noise((5, 3), dtype=x.dtype, device=x.device).shape == (5, 3)


def test_sml_noise_is_reshaped_to_the_latent_shape_and_may_be_a_share_of_the_draw():
    model = glow_flow((1, 4, 4), levels=2, steps=1, hidden=4).double()  # latent (16,), data (1, 4, 4)
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    model.initialize(x)
    noise = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    terms = sml_loss(model, x, noise=noise)
    with torch.no_grad():
        e_model = model.energy(model.inverse(noise.reshape(6, 16))).mean()
    torch.testing.assert_close(terms.loss, terms.energy - e_model)
    # a process's share of a global draw: its row count wins over num_samples
    share = sml_loss(model, x, num_samples=12, noise=noise[:3])
    with torch.no_grad():
        e_share = model.energy(model.inverse(noise[:3].reshape(3, 16))).mean()
    torch.testing.assert_close(share.loss, share.energy - e_share)
    with pytest.raises(ConfigError, match="one row of 16 latent entries"):
        sml_loss(model, x, noise=torch.randn(6, 15, dtype=torch.float64))


def test_sml_loss_of_a_batch_is_the_mean_of_its_halves_given_the_same_noise():
    x = torch.randn(8, 3, dtype=torch.float64)
    model = initialised(tiny_model(), x)
    objective = make_objective("sml")
    noise = objective.draw_noise(
        tuple(x.shape), dtype=x.dtype, device=x.device, generator=torch.Generator().manual_seed(3)
    )
    full = objective(model, x, noise=noise)
    halves = [
        objective(model, x[i : i + 4], noise=noise.narrow(objective.noise_batch_dim, i, 4)) for i in (0, 4)
    ]
    torch.testing.assert_close(full, (halves[0] + halves[1]) / 2)


# -- one initial model for every objective -----------------------------------------------------------
def _actnorm_state(model: EBFlow) -> list[torch.Tensor]:
    return [
        t.detach().clone()
        for layer in model.layers
        if isinstance(layer, ActNorm)
        for t in (layer.shift, layer.log_scale)
    ]


@pytest.mark.parametrize(
    "build, shape", [(tiny_model, (3,)), (image_model_1ch, (1, 4, 4))], ids=["vector", "image"]
)
def test_every_objective_starts_from_the_same_initial_model(build, shape):
    """With an explicit model.initialize(x), DSM and FDSSM used as a library (whose first energy
    is of perturbed data) start from the same ActNorm parameters as SSM -- the statistics of the
    clean batch -- and computing a loss never changes them."""
    x = torch.randn(16, *shape, dtype=torch.float64) * 2 + 0.5
    states = {}
    for name, options in (
        ("ssm", {}),
        ("dsm", {"sigma": 0.5}),
        ("fdssm", {"eps": 0.5}),
        ("ml", {}),
        ("sml", {}),
        ("esm", {}),
    ):
        torch.manual_seed(0)
        model = build()
        model.initialize(x)
        states[name] = _actnorm_state(model)
        make_objective(name, **options)(model, x).backward()
        for before, after in zip(states[name], _actnorm_state(model), strict=True):
            torch.testing.assert_close(after, before, atol=0, rtol=0)
    for name in ("dsm", "fdssm", "ml", "sml", "esm"):
        for a, b in zip(states[name], states["ssm"], strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert states["ssm"] and not all(bool((t == 0).all()) for t in states["ssm"])


# -- ESM through torch.func ----------------------------------------------------------------------------
def _esm_by_a_loop_of_hessian_vector_products(model, x):
    """The reference: D Hessian-vector products with create_graph, one basis vector at a time."""
    xr = x.detach().requires_grad_(True)
    e = model.energy(xr)
    (g,) = torch.autograd.grad(e.sum(), xr, create_graph=True)
    g_flat = g.reshape(g.shape[0], -1)
    d = g_flat.shape[1]
    trace = torch.zeros(x.shape[0], dtype=x.dtype)
    for i in range(d):
        (row,) = torch.autograd.grad(g_flat[:, i].sum(), xr, create_graph=True)
        trace = trace + row.reshape(row.shape[0], -1)[:, i]
    return (-trace + 0.5 * g_flat.pow(2).sum(1)) / d


@pytest.mark.parametrize(
    "build, shape", [(tiny_model, (3,)), (image_model_1ch, (1, 4, 4))], ids=["vector", "image"]
)
def test_esm_matches_the_loop_of_hessian_vector_products_in_value_and_gradient(build, shape):
    x = torch.randn(6, *shape, dtype=torch.float64)
    model = initialised(build(), x, scale=0.2)
    got = esm_loss(model, x)
    expected = _esm_by_a_loop_of_hessian_vector_products(model, x)
    torch.testing.assert_close(got.loss, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got.energy, model.energy(x))
    params = _params(model)
    g_got = torch.autograd.grad(got.loss.sum(), params, allow_unused=True)
    g_expected = torch.autograd.grad(expected.sum(), params, allow_unused=True)
    for a, b in zip(g_got, g_expected, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-10 * (1 + float(b.abs().max())), rtol=1e-10)
    with torch.no_grad():  # validation computes it without gradients to the parameters
        torch.testing.assert_close(esm_loss(model, x).loss, expected.detach(), atol=1e-12, rtol=1e-12)


# -- the plain training loop is the fast path ---------------------------------------------------------
class _CountOps(TorchDispatchMode):
    """Counts the aten ops that run while it is active (here: during a backward pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _no_prefix_model() -> EBFlow:
    """First layer non-linear: no linear prefix (the derivative in x is taken by torch.func alone)."""
    return EBFlow(
        [SmoothLeakyReLU(0.3), Dense(3), AffineCoupling((3,), hidden=4, depth=1), Dense(3)], (3,)
    ).double()


def _wide_conv_model() -> EBFlow:
    """8 channels: oneDNN's own convolution backward (not the few-channel custom function)."""
    return EBFlow([Conv2d(8, 3), ResidualSmoothLeakyReLU(0.3), Conv2d(8, 3)], (8, 2, 2)).double()


FAST_PATH_MODELS = {
    "dense": (tiny_model, (3,)),
    "no-prefix": (_no_prefix_model, (3,)),
    "conv": (image_model_1ch, (1, 4, 4)),
    "wide-conv": (_wide_conv_model, (8, 2, 2)),
}


@pytest.mark.parametrize(
    "name, options",
    [
        ("ssm", {}),
        ("ssm", {"slices": 2}),
        ("dsm", {"sigma": 0.3}),
        ("fdssm", {"eps": 0.1}),
        ("esm", {}),
        ("dsm", {"sigma": 0.3, "energy_reg": 0.1}),
    ],
)
@pytest.mark.parametrize("model_name", list(FAST_PATH_MODELS))
def test_a_plain_backward_computes_the_parameter_gradients_only(name, options, model_name):
    """objective(model, x).backward() (the README's loop) does exactly the work of
    backward(inputs=params): the graph reaches no leaf but the parameters (no input gradient of
    the first layer, nothing accumulated into a copy of the data), the same number of aten ops
    runs, and the gradients are equal."""
    build, shape = FAST_PATH_MODELS[model_name]
    x = torch.rand(6, *shape, dtype=torch.float64) * 0.8 + 0.1
    model = initialised(build(), x, scale=0.2)
    objective = make_objective(name, **options)
    noise = objective.draw_noise(tuple(x.shape), dtype=x.dtype, device=x.device)
    params = _params(model)
    ids = {id(p) for p in params}
    results = []
    for plain in (True, False):
        model.zero_grad(set_to_none=True)
        loss = objective(model, x, noise=noise)
        assert all(id(leaf) in ids for leaf in accumulated_leaves(loss))
        with _CountOps() as ops:
            loss.backward() if plain else loss.backward(inputs=params)
        results.append((loss.detach(), ops.count, [p.grad.clone() for p in params]))
    (v_plain, n_plain, g_plain), (v_params, n_params, g_params) = results
    assert n_plain == n_params
    assert torch.equal(v_plain, v_params)
    for a, b in zip(g_plain, g_params, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def _dsm_on_a_leaf(model, x, sigma, eps):
    """DSM as written before: autograd on a leaf copy of the perturbed data."""
    xt = (x + sigma * eps).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model.energy(xt).sum(), xt, create_graph=True)
    return 0.5 * (g - eps / sigma).pow(2).reshape(x.shape[0], -1).sum(1) / x[0].numel()


def _ssm_on_a_leaf(model, x, v):
    xl = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model.energy(xl).sum(), xl, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), xl, create_graph=True)
    per = -(hv * v).reshape(x.shape[0], -1).sum(1) + 0.5 * g.pow(2).reshape(x.shape[0], -1).sum(1)
    return per / x[0].numel()


@pytest.mark.parametrize("model_name", list(FAST_PATH_MODELS))
def test_the_fast_path_equals_autograd_on_a_leaf(model_name):
    build, shape = FAST_PATH_MODELS[model_name]
    x = torch.rand(6, *shape, dtype=torch.float64) * 0.8 + 0.1
    model = initialised(build(), x, scale=0.2)
    eps, v = torch.randn_like(x), torch.randn_like(x)
    params = _params(model)
    for got, expected in (
        (dsm_loss(model, x, 0.3, noise=eps).loss, _dsm_on_a_leaf(model, x, 0.3, eps)),
        (ssm_loss(model, x, noise=v[None]).loss, _ssm_on_a_leaf(model, x, v)),
    ):
        torch.testing.assert_close(
            got, expected, atol=1e-12 * (1 + float(expected.detach().abs().max())), rtol=0
        )
        grads = (torch.autograd.grad(got.sum(), params), torch.autograd.grad(expected.sum(), params))
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12 * (1 + float(b.abs().max())), rtol=0)
    # the public score with create_graph=True: same values, a graph to the parameters only
    xt = x + 0.3 * eps
    score = model.score(xt, create_graph=True)
    xl = xt.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model.energy(xl).sum(), xl, create_graph=True)
    torch.testing.assert_close(score, -g, atol=1e-12, rtol=0)
    assert all(id(leaf) in {id(p) for p in params} for leaf in accumulated_leaves(score.pow(2).sum()))

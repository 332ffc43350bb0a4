"""The cache policy of linear layers (ebflow.layers.cache): log Z and factorisations are reused
while the parameters are unchanged and are fresh and correct after every kind of update."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import perturb
from ebflow import EBFlow, make_objective
from ebflow.layers import (
    ActNorm,
    CircularConv2d,
    Conv1x1,
    Conv2d,
    Dense,
    Flatten,
    GroupedConv2d,
    LinearFlowLayer,
    LinearMap,
    ParameterCache,
    ResidualSmoothLeakyReLU,
    SmoothLeakyReLU,
)
from ebflow.layers.cache import needs_grad, parameter_state
from helpers import RowMixing

pytestmark = pytest.mark.usefixtures("one_thread")


def near_identity_conv(channels: int) -> nn.Conv2d:
    """A torch convolution (a sub-module holding the weights) with reflection padding."""
    conv = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
    with torch.no_grad():
        conv.weight.mul_(0.1)
        conv.weight[:, :, 1, 1] += torch.eye(channels)
    return conv


def vector_model() -> EBFlow:
    return EBFlow(
        [
            Dense(4),
            SmoothLeakyReLU(0.3),
            Dense(4, parameterization="lu"),
            ActNorm(4),
            Dense(4, parameterization="tril"),
            ResidualSmoothLeakyReLU(0.2),
            Dense(4, parameterization="triu"),
        ],
        (4,),
    )


def image_model() -> EBFlow:
    shape = (2, 4, 4)
    return EBFlow(
        [
            Conv2d(2, 3),
            Conv1x1(2, bias=True),
            ActNorm(2),
            SmoothLeakyReLU(0.3),
            LinearMap(near_identity_conv(2), shape),
            CircularConv2d(shape, 3),
            GroupedConv2d(shape, 3, groups=2),
            RowMixing(shape),
            Flatten(shape),
            Dense(32),
        ],
        shape,
    )


MODELS = {"vector": (vector_model, (4,)), "image": (image_model, (2, 4, 4))}


def brute_force_log_partition(model: EBFlow) -> torch.Tensor:
    """-sum over linear layers of log|det| of each layer's Jacobian from autograd (float64), with
    no use of the layers' own determinant, factorisation or cache."""
    total = torch.zeros((), dtype=torch.float64)
    for layer, shape in zip(model.layers, model.layer_input_shapes, strict=True):
        if not isinstance(layer, LinearFlowLayer):
            continue
        at = torch.zeros(shape, dtype=model.dtype).reshape(-1)
        jac = torch.autograd.functional.jacobian(
            lambda v, layer=layer, shape=shape: layer.transform(v.view(1, *shape)).reshape(-1), at
        )
        total = total - torch.linalg.slogdet(jac.double())[1]
    return total


class Calls:
    """Counts the log-determinant computations (``_compute_log_abs_det``, where the gradient-vs-cache
    decision is made) and the ``_factorize`` calls of the linear layers of a model that cache them
    (``caches_derived_values``; monkeypatched on the classes)."""

    def __init__(self, monkeypatch, model: EBFlow) -> None:
        self.count = 0
        for cls in {type(layer) for layer in model.layers if isinstance(layer, LinearFlowLayer)}:
            for name in ("_compute_log_abs_det", "_factorize"):
                monkeypatch.setattr(cls, name, self._counted(getattr(cls, name)))

    def _counted(self, original):
        def counted(layer, *args, **kwargs):
            self.count += layer.caches_derived_values
            return original(layer, *args, **kwargs)

        return counted


def _gradients(model: EBFlow, x: torch.Tensor) -> None:
    model.zero_grad()
    make_objective("ml")(model, x).backward()


def _optimizer_step(make):
    def update(model: EBFlow, x: torch.Tensor) -> None:
        optimizer = make(model.parameters())
        for _ in range(2):
            _gradients(model, x)
            optimizer.step()

    return update


def _fused_adam(params):
    try:
        return torch.optim.Adam(params, lr=0.01, fused=True)
    except RuntimeError as err:  # fused kernels not available for this device/dtype
        pytest.skip(f"torch has no fused Adam here: {err}")


def _load_state_dict(model: EBFlow, x: torch.Tensor) -> None:
    other = perturb(copy.deepcopy(model), 0.1)
    model.load_state_dict(other.state_dict())


def _rebind_data(model: EBFlow, x: torch.Tensor) -> None:
    for p in model.parameters():
        p.data = p.data + 0.05 * torch.randn_like(p)  # new storage; the version counter restarts


def _write_data_in_place(model: EBFlow, x: torch.Tensor) -> None:
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))  # through .data: no version bump on p


UPDATES = {
    "sgd": _optimizer_step(lambda ps: torch.optim.SGD(ps, lr=0.01)),
    "adam-foreach": _optimizer_step(lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=True)),
    "adam-fused": _optimizer_step(_fused_adam),
    "rmsprop": _optimizer_step(lambda ps: torch.optim.RMSprop(ps, lr=1e-3)),
    "load-state-dict": _load_state_dict,
    "data-rebinding": _rebind_data,
    "data-in-place": _write_data_in_place,
    "to-float64": lambda model, x: model.to(torch.float64),
}


@pytest.mark.parametrize("update", list(UPDATES))
@pytest.mark.parametrize("name", list(MODELS))
def test_log_partition_is_fresh_and_correct_after_every_kind_of_update(name, update, monkeypatch):
    """Held-out check: after each update, log Z (and the inverse) are recomputed and exact; a
    repeated call without changes recomputes nothing."""
    build, shape = MODELS[name]
    model = build()
    x = torch.randn(16, *shape)
    model.initialize(x)
    perturb(model, 0.05)
    calls = Calls(monkeypatch, model)
    with torch.no_grad():
        before = model.log_partition()
        model.sample(2)  # the factorisations are cached too
    counted = calls.count
    with torch.no_grad():
        torch.testing.assert_close(model.log_partition(), before, atol=0, rtol=0)
        model.sample(2)
    assert calls.count == counted, "a repeated call without changes recomputed"

    UPDATES[update](model, x)
    if update == "to-float64":
        x = x.double()
        assert model.dtype == torch.float64
    counted = calls.count
    with torch.no_grad():
        after = model.log_partition()
        z = model(x)
    assert calls.count > counted, "log Z was served from the cache after an update"
    if update != "to-float64":  # (log Z is float64 in any case: a cast need not change it)
        assert not torch.equal(after, before)
    expected = brute_force_log_partition(model)
    tol = 1e-10 if model.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(after, expected, atol=tol * (1 + float(expected.abs())), rtol=0)
    with torch.no_grad():  # fresh factorisations (those of log Z above, for the new parameters)
        torch.testing.assert_close(model.inverse(z), x, atol=100 * tol, rtol=0)
    counted = calls.count
    with torch.no_grad():
        torch.testing.assert_close(model.log_partition(), after, atol=0, rtol=0)
        model.inverse(z)
    assert calls.count == counted, "a repeated call without changes recomputed"


@pytest.mark.parametrize("name", list(MODELS))
def test_repeated_calls_without_changes_compute_nothing(name, monkeypatch):
    build, shape = MODELS[name]
    model = build().double()
    model.initialize(torch.randn(8, *shape, dtype=torch.float64))
    calls = Calls(monkeypatch, model)
    with torch.no_grad():
        first = model.log_partition()
        z = torch.randn(3, *model.latent_shape, dtype=torch.float64)
        model.inverse(z)
    counted = calls.count
    assert counted > 0
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(model.log_partition(), first, atol=0, rtol=0)
            model.inverse(z)
            model.log_prob(torch.randn(2, *shape, dtype=torch.float64))
    assert calls.count == counted


def test_log_partition_is_cached_until_parameters_change(monkeypatch):
    model = EBFlow([Dense(5), Dense(5, parameterization="lu")], (5,)).double()
    calls = Calls(monkeypatch, model)
    with torch.no_grad():
        first = model.log_partition()
        for _ in range(3):
            torch.testing.assert_close(model.log_partition(), first)
    computed = calls.count
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    model.energy(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
    optimiser.step()
    with torch.no_grad():
        changed = model.log_partition()
        model.log_partition()
    assert calls.count == 2 * computed
    assert not torch.allclose(changed, first)


def test_convolution_factorisation_is_shared_by_inverse_and_log_det(monkeypatch):
    layer = perturb(Conv2d(2, 3).double(), 0.05)
    model = EBFlow([layer], (2, 4, 4)).double()
    counts = {"factorize": 0}
    original = Conv2d._factorize

    def counted(layer, *args, **kwargs):
        counts["factorize"] += 1
        return original(layer, *args, **kwargs)

    monkeypatch.setattr(Conv2d, "_factorize", counted)
    with torch.no_grad():
        model.log_partition()
        model.sample(3)
        model.inverse(torch.randn(2, 2, 4, 4, dtype=torch.float64))
        model.log_prob(torch.randn(2, 2, 4, 4, dtype=torch.float64))
    assert counts["factorize"] == 1
    with torch.no_grad():
        layer.weight.add_(0.01)
        model.log_partition()
    assert counts["factorize"] == 2


@pytest.mark.parametrize(
    "build",
    [
        lambda: RowMixing((2, 4, 4)),
        lambda: LinearMap(near_identity_conv(2), (2, 4, 4)),
        lambda: CircularConv2d((2, 4, 4), 3),
        lambda: GroupedConv2d((2, 4, 4), 3, groups=2),
    ],
    ids=["custom-subclass", "linear-map-module", "circular", "grouped"],
)
def test_generic_layers_factorise_once_per_state_for_log_partition_and_sampling(build, monkeypatch):
    shape = (2, 4, 4)
    model = EBFlow(
        [build(), ResidualSmoothLeakyReLU(0.3), build(), SmoothLeakyReLU(0.3), build()], shape
    ).double()
    cls = type(model.layers[0])
    counts = {"factorize": 0}
    original = cls._factorize

    def counted(layer, *args, **kwargs):
        counts["factorize"] += 1
        return original(layer, *args, **kwargs)

    monkeypatch.setattr(cls, "_factorize", counted)
    with torch.no_grad():
        first = model.log_partition()
        torch.testing.assert_close(model.log_partition(), first)
        model.sample(2)
    assert counts["factorize"] == 3  # once per layer, shared by log Z and sampling
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    make_objective("dsm", sigma=0.1)(model, torch.randn(8, *shape, dtype=torch.float64)).backward()
    optimiser.step()
    with torch.no_grad():
        changed = model.log_partition()
        model.log_partition()
    assert counts["factorize"] == 6
    assert not torch.allclose(changed, first)


def test_a_sub_module_weight_change_is_seen():
    """The key covers sub-modules' parameters (LinearMap keeps its weights in the wrapped module),
    even for a write through ``.data`` that bumps no version counter."""
    layer = LinearMap(near_identity_conv(2), (2, 4, 4)).double()
    model = EBFlow([layer], (2, 4, 4)).double()
    with torch.no_grad():
        before = model.log_partition()
        layer.fn.weight.data[:, :, 1, 1] *= 1.5
        after = model.log_partition()
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, brute_force_log_partition(model), atol=1e-10, rtol=0)


def test_values_that_carry_gradients_are_never_served_from_the_cache(monkeypatch):
    model = perturb(EBFlow([Dense(3), Dense(3, parameterization="lu")], (3,)).double())
    calls = Calls(monkeypatch, model)
    with torch.no_grad():
        model.log_partition()
    counted = calls.count
    for _ in range(2):
        logz = model.log_partition()  # grad mode on, parameters require grad
        assert logz.requires_grad
    assert calls.count == counted + 2  # the full Dense (the LU one keeps no cache: not counted)
    with torch.no_grad():  # ... and a value computed with gradients serves later no-grad calls
        model.log_partition()
    assert calls.count == counted + 2
    model.requires_grad_(False)  # no parameter requires grad: served from the cache
    assert not needs_grad(model.layers[0])
    model.log_partition()
    assert calls.count == counted + 2


@pytest.mark.parametrize("parameterization", ["lu", "tril", "triu"])
def test_closed_form_layers_keep_no_cache_and_read_no_fingerprint(parameterization, monkeypatch):
    """Fails when a Dense whose log|det| is a diagonal fingerprints its parameters (a float64 sum
    and norm of every D x D parameter and buffer: 60 % of an ML step at D = 3,072) or keeps a
    stale value after an update."""
    import ebflow.layers.cache as cache_module

    fingerprints = []
    real = cache_module._state_parts
    monkeypatch.setattr(cache_module, "_state_parts", lambda m: fingerprints.append(m) or real(m))
    layer = Dense(4, parameterization=parameterization)
    model = perturb(EBFlow([layer, SmoothLeakyReLU(0.3), Dense(4, parameterization=parameterization)], (4,)))
    x = torch.randn(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # maximum-likelihood steps
        optimizer.zero_grad()
        (-model.log_prob(x).mean()).backward()
        optimizer.step()
    with torch.no_grad():
        logdet = layer.log_abs_det((4,))
        torch.testing.assert_close(logdet, torch.linalg.slogdet(layer.matrix())[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.inverse(model(x)), x, atol=1e-4, rtol=0)
    assert fingerprints == [] and len(layer._cache) == 0
    with torch.no_grad():
        layer.bias.add_(1.0)
        layer.upper.mul_(2.0) if parameterization == "lu" else layer.weight.mul_(2.0)
    with torch.no_grad():  # no stale value: log|det| follows the update
        torch.testing.assert_close(
            layer.log_abs_det((4,)), torch.linalg.slogdet(layer.matrix())[1], atol=1e-5, rtol=0
        )


def test_clear_cache_forgets_everything(monkeypatch):
    model = EBFlow([Dense(3)], (3,)).double()
    calls = Calls(monkeypatch, model)
    with torch.no_grad():
        model.log_partition()
        model.log_partition()
        assert calls.count == 1 + 1  # _log_abs_det and the factorisation it reads
        model.layers[0].clear_cache()
        model.log_partition()
    assert calls.count == 4


def test_parameter_cache_on_its_own():
    module = nn.Linear(3, 3)
    cache = ParameterCache()
    n = {"calls": 0}

    def compute():
        n["calls"] += 1
        return module.weight.sum() * 2

    with torch.no_grad():
        first = cache.get("value", (3,), compute, module)
        assert cache.get("value", (3,), compute, module) is first
        cache.get("value", (4,), compute, module)  # another event shape: another entry
        assert n["calls"] == 2 and len(cache) == 2
        state = parameter_state(module)
        module.weight.add_(1.0)
        assert parameter_state(module) != state
        cache.get("value", (3,), compute, module)  # a new state drops the old entries
    assert n["calls"] == 3 and len(cache) == 1
    cache.clear()
    assert len(cache) == 0
    module64 = copy.deepcopy(module).to(torch.float64)
    assert parameter_state(module64) != parameter_state(module)

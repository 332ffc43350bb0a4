"""Generic linear layers from a map (GenericLinear, LinearMap) and the layers built on them:
exact density against brute force, inverses, cheap paths against the generic dense path,
the construction-time checks, and that score matching never touches determinants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import initialised, perturb
from ebflow import EBFlow, make_objective
from ebflow.errors import ConfigError, InputError, SingularLayerError
from ebflow.layers import (
    DCT,
    CircularConv2d,
    DepthwiseConv2d,
    DilatedConv2d,
    Flatten,
    GenericLinear,
    GroupedConv2d,
    LinearFlowLayer,
    LinearMap,
    ResidualSmoothLeakyReLU,
    SmoothLeakyReLU,
)
from ebflow.layers.generic_conv import circular_conv2d
from helpers import RowMixing, brute_force_log_prob, spy_on_linear_algebra

pytestmark = pytest.mark.usefixtures("one_thread")


SHAPE = (2, 4, 4)


def reflect_conv() -> nn.Conv2d:
    """A torch convolution with reflection padding, near the identity."""
    conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    with torch.no_grad():
        conv.weight.mul_(0.1)
        conv.weight[:, :, 1, 1] += torch.eye(2)
    return conv


LAYERS = {
    "custom-subclass": lambda: RowMixing(SHAPE),
    "linear-map-module": lambda: LinearMap(reflect_conv(), SHAPE),
    "linear-map-function": lambda: LinearMap(lambda x: 2.0 * x.flip(-1) - x, SHAPE, bias=True),
    "grouped": lambda: GroupedConv2d(SHAPE, 3, groups=2),
    "depthwise": lambda: DepthwiseConv2d(SHAPE, 3),
    "dilated": lambda: DilatedConv2d(SHAPE, 3, dilation=2),
    "circular": lambda: CircularConv2d(SHAPE, 3),
    "circular-dilated": lambda: CircularConv2d(SHAPE, 3, dilation=2),
    "circular-fft": lambda: CircularConv2d(SHAPE, 5),
    "dct": lambda: DCT(SHAPE),
}


def model_with(build) -> EBFlow:
    """[layer, non-linearity, layer, non-linearity, layer]: the layer between non-linear ones."""
    layers = [build(), ResidualSmoothLeakyReLU(0.3), build(), SmoothLeakyReLU(0.3), build()]
    return EBFlow(layers, SHAPE).double()


@pytest.mark.parametrize("name", list(LAYERS))
def test_log_prob_matches_change_of_variables_by_brute_force(name):
    x = torch.randn(6, *SHAPE, dtype=torch.float64)
    model = initialised(model_with(LAYERS[name]), x, scale=0.2)
    expected = brute_force_log_prob(model, x[:3])
    with torch.no_grad():
        got = model.log_prob(x[:3])
    torch.testing.assert_close(got, expected, atol=1e-8, rtol=0)


@pytest.mark.parametrize("name", list(LAYERS))
def test_inverse_of_forward_is_identity(name):
    x = torch.randn(5, *SHAPE, dtype=torch.float64)
    model = initialised(model_with(LAYERS[name]), x, scale=0.2)
    with torch.no_grad():
        torch.testing.assert_close(model.inverse(model(x)), x, atol=1e-9, rtol=0)
        layer = model.layers[0]
        torch.testing.assert_close(layer.inverse(layer.transform(x)), x, atol=1e-10, rtol=0)
        assert torch.isfinite(model.sample(4)).all()


@pytest.mark.parametrize("name", ["circular", "circular-dilated", "circular-fft", "dct"])
def test_cheap_exact_path_agrees_with_the_generic_dense_path(name):
    layer = perturb(LAYERS[name]().double(), 0.2)
    y = torch.randn(4, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer.log_abs_det(SHAPE), layer.dense_log_abs_det(), atol=1e-10, rtol=0)
        torch.testing.assert_close(layer.inverse(y), layer.dense_inverse(y), atol=1e-10, rtol=0)


def test_circular_log_det_gradient_matches_the_dense_path():
    layer = perturb(CircularConv2d(SHAPE, 3).double(), 0.2)
    fast = torch.autograd.grad(layer.log_abs_det(SHAPE), layer.weight)[0]
    dense = torch.autograd.grad(layer.dense_log_abs_det(), layer.weight)[0]
    torch.testing.assert_close(fast, dense, atol=1e-10, rtol=0)


def test_circular_convolution_is_periodic_and_its_gradients_are_exact():
    layer = perturb(CircularConv2d((1, 5, 5), 3, bias=False).double(), 0.2)
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    shifted = layer.transform(x.roll((1, 2), dims=(-2, -1)))
    torch.testing.assert_close(shifted, layer.transform(x).roll((1, 2), dims=(-2, -1)))
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    xx = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: circular_conv2d(a, b, dilation=2), (xx, w))


@pytest.mark.parametrize("kernel_size, dilation", [(3, 1), (5, 1), (3, 2), (7, 1)])
def test_circular_convolution_by_fft_equals_the_direct_one(kernel_size, dilation):
    direct = perturb(CircularConv2d((3, 7, 6), kernel_size, dilation=dilation, method="direct").double(), 0.2)
    fft = CircularConv2d((3, 7, 6), kernel_size, dilation=dilation, method="fft").double()
    fft.load_state_dict(direct.state_dict())
    x = torch.randn(4, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    y_direct, y_fft = direct.transform(x), fft.transform(x)
    torch.testing.assert_close(y_fft, y_direct, atol=1e-12, rtol=0)
    grads = {}
    for name, layer, y in (("direct", direct, y_direct), ("fft", fft, y_fft)):  # second order, as SM needs
        (score,) = torch.autograd.grad(y.sin().sum(), x, create_graph=True)
        grads[name] = torch.autograd.grad((score**2).sum(), (x, layer.weight, layer.bias))
    for a, b in zip(grads["fft"], grads["direct"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_matrix_is_the_map():
    layer = perturb(LAYERS["linear-map-module"]().double(), 0.2)
    x = torch.randn(3, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        by_matrix = (x.reshape(3, -1) @ layer.matrix().T + layer.shift().reshape(-1)).reshape(x.shape)
        torch.testing.assert_close(by_matrix, layer.transform(x))


def test_float32_layer_builds_its_matrix_in_float64():
    layer = DCT((1, 6, 6))
    with torch.no_grad():
        m = layer.matrix()
    assert m.dtype == torch.float64
    torch.testing.assert_close(m @ m.T, torch.eye(36, dtype=torch.float64), atol=1e-13, rtol=0)


# -- score matching never needs determinants ---------------------------------------------------------
LAYER_CLASSES = (
    LinearFlowLayer,
    GenericLinear,
    LinearMap,
    GroupedConv2d,
    DepthwiseConv2d,
    DilatedConv2d,
    CircularConv2d,
    DCT,
    RowMixing,
)


@pytest.fixture
def forbid_linear_algebra(monkeypatch):
    """``activate()`` makes every determinant / inverse / factorisation routine and every
    derived-matrix method of the generic layers (the circular convolution's ``spectrum`` too)
    raise when called. The FFT itself is allowed: the circular convolution's map uses it."""
    methods = (
        "log_abs_det",
        "_log_abs_det",
        "_factorize",
        "inverse",
        "_inverse_with",
        "matrix",
        "shift",
        "spectrum",
        "dense_log_abs_det",
        "dense_inverse",
    )
    return lambda: spy_on_linear_algebra(monkeypatch, LAYER_CLASSES, methods)


def every_generic_layer_model() -> EBFlow:
    layers = [build() for build in LAYERS.values()]
    for i in range(len(layers) - 1, 0, -1):
        layers.insert(i, ResidualSmoothLeakyReLU(0.3))
    return EBFlow(layers, SHAPE).double()


@pytest.mark.parametrize(
    "name, options", [("ssm", {}), ("dsm", {"sigma": 0.1}), ("fdssm", {"eps": 0.1}), ("esm", {})]
)
def test_score_matching_never_calls_linear_algebra_of_generic_layers(name, options, forbid_linear_algebra):
    x = torch.randn(4, *SHAPE, dtype=torch.float64)
    model = every_generic_layer_model()
    objective = make_objective(name, **options)
    calls = forbid_linear_algebra()
    loss = objective(model, x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert calls == []


def test_the_spy_catches_maximum_likelihood(forbid_linear_algebra):
    model = every_generic_layer_model()
    calls = forbid_linear_algebra()
    with pytest.raises(AssertionError):
        make_objective("ml")(model, torch.randn(4, *SHAPE, dtype=torch.float64))
    assert calls


# -- maximum likelihood (the cache of log Z and factorisations: test_cache.py) ---------------------------
def test_log_partition_is_differentiable_for_maximum_likelihood():
    layer = perturb(RowMixing((1, 3, 3)).double(), 0.2)
    EBFlow([layer], (1, 3, 3)).double().log_partition().backward()
    expected = -3 * torch.linalg.inv(layer.weight.detach()).T  # d(-3 log|det W|)/dW
    torch.testing.assert_close(layer.weight.grad, expected)


# -- construction-time checks --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fn, problem",
    [
        (torch.tanh, "not affine: f\\(a \\+ c\\)"),
        (lambda x: x + x.pow(2), "not affine"),
        (lambda x: x - x.mean(0, keepdim=True), "examples are not independent"),
        (lambda x: x[..., :2], "same shape"),
        (lambda x: x.sum(), "same shape"),
    ],
)
def test_the_linearity_and_shape_check_fires(fn, problem):
    with pytest.raises(ConfigError, match=problem):
        LinearMap(fn, (3, 4))
    LinearMap(fn, (3, 4), check=False)  # the user can opt out


def test_a_subclass_is_checked_after_its_own_init():
    class Squares(GenericLinear):
        def __init__(self) -> None:
            super().__init__((4,))
            self.scale = nn.Parameter(torch.ones(4))

        def transform(self, x):
            return self.scale * x * x

    with pytest.raises(ConfigError, match="Squares: the map is not affine"):
        Squares()


def test_a_failing_map_gives_a_clear_error():
    with pytest.raises(ConfigError, match="transform failed on a batch of events of shape \\(3,\\)"):
        LinearMap(nn.Linear(4, 4), (3,))


def test_too_large_event_gives_a_clear_error_instead_of_running_out_of_memory():
    with pytest.raises(ConfigError, match="D = 10000 dimensions, more than max_dim = 8192"):
        LinearMap(lambda x: x, (100, 100))
    with pytest.raises(ConfigError, match="more than max_dim = 10"):
        GroupedConv2d((1, 4, 4), 3, max_dim=10)
    LinearMap(lambda x: x, (10, 10), max_dim=100)
    # layers with a cheaper exact structure need no dense matrix; only the reference path is bounded
    layer = CircularConv2d((1, 8, 8), 3, max_dim=10)
    assert torch.isfinite(layer.log_abs_det((1, 8, 8)))
    with pytest.raises(ConfigError, match="max_dim"):
        layer.matrix()


def test_wrong_shapes_and_options_are_rejected():
    layer = GroupedConv2d(SHAPE, 3)
    with pytest.raises(ConfigError, match="layer 0"):
        EBFlow([layer], (2, 4, 5))
    with pytest.raises(InputError, match="expects images of shape"):
        layer.transform(torch.randn(2, 2, 4, 5))
    with pytest.raises(InputError, match="built for events of shape"):
        layer.inverse(torch.randn(2, 2, 4, 5))
    with pytest.raises(ConfigError, match="groups must be a positive divisor"):
        GroupedConv2d(SHAPE, 3, groups=3)
    with pytest.raises(ConfigError, match="odd"):
        CircularConv2d(SHAPE, 4)
    with pytest.raises(ConfigError, match="wrap around"):
        CircularConv2d(SHAPE, 5, dilation=3)
    with pytest.raises(ConfigError, match="vectors"):
        DCT((2, 3))
    with pytest.raises(ConfigError, match="callable"):
        LinearMap(3, (2,))


def test_singular_map_raises_when_inverting():
    layer = LinearMap(lambda x: x * torch.tensor([1.0, 0.0, 2.0], dtype=x.dtype), (3,))
    with pytest.raises(SingularLayerError):
        layer.inverse(torch.randn(2, 3))


def test_dct_on_vectors_inside_a_vector_model():
    model = EBFlow([DCT((6,)), SmoothLeakyReLU(0.3), LinearMap(nn.Linear(6, 6), (6,))], (6,)).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x), brute_force_log_prob(model, x), atol=1e-8, rtol=0)
        torch.testing.assert_close(model.inverse(model(x)), x, atol=1e-10, rtol=0)


def test_flattened_events_work_too():
    model = EBFlow(
        [Flatten(SHAPE), LinearMap(nn.Linear(32, 32), (32,)), SmoothLeakyReLU(0.3)], SHAPE
    ).double()
    x = torch.randn(3, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x), brute_force_log_prob(model, x), atol=1e-8, rtol=0)


def test_conv_flow_takes_any_convolution_layer():
    """``conv_flow(conv=...)`` keeps the paper's CNN layout with another linear layer in place of
    Conv2d (what examples/mnist_custom_layer.py trains), and its density stays exact."""
    from ebflow import conv_flow
    from ebflow.layers import CircularConv2d

    torch.manual_seed(0)
    model = conv_flow(
        (1, 4, 4), blocks=2, convs_per_block=2, kernel_size=3, conv=lambda shape, k: CircularConv2d(shape, k)
    ).double()
    convs = [l for l in model.layers if isinstance(l, CircularConv2d)]
    assert [tuple(l.event_shape) for l in convs] == [(1, 4, 4), (1, 4, 4), (4, 2, 2), (4, 2, 2)]
    assert not any(type(l).__name__ == "Conv2d" for l in model.layers)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(model.log_prob(x), brute_force_log_prob(model, x), rtol=1e-8, atol=1e-8)

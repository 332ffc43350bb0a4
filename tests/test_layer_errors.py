"""Clear errors (or none) where a custom linear layer or a model is easy to get wrong: a cheaper
exact structure above ``max_dim``, a tensor captured from outside the layer, a module with
train/eval behaviour inside ``LinearMap``, layers of different dtypes in one model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ebflow import EBFlow
from ebflow.errors import ConfigError
from ebflow.layers import DCT, Dense, GenericLinear, LinearMap, SmoothLeakyReLU


class _Scale(GenericLinear):
    """y = 2 x, with its exact structure (dense = False) or through the dense path."""

    def transform(self, x):
        return 2.0 * x


class _StructuredScale(_Scale):
    dense = False

    def _log_abs_det(self, event_shape):
        return torch.tensor(
            self.dim * torch.log(torch.tensor(2.0, dtype=torch.float64)).item(), dtype=torch.float64
        )

    def _factorize(self, event_shape):
        return None

    def _inverse_with(self, factors, y):
        return y / 2.0


def test_a_structured_subclass_is_not_refused_for_its_size_but_the_dense_path_is():
    layer = _StructuredScale((50,), max_dim=10)
    x = torch.randn(3, 50)
    y, logdet = layer(x)
    torch.testing.assert_close(layer.inverse(y), x)
    assert float(logdet[0]) == pytest.approx(50 * 0.6931471805599453)
    with pytest.raises(ConfigError, match="max_dim"):
        _Scale((50,), max_dim=10)
    DCT((50,), max_dim=10)  # the library's own structured layer


def test_a_tensor_captured_from_outside_the_layer_gets_an_error_that_says_what_to_do():
    weight = torch.eye(3) + 0.1 * torch.randn(3, 3)
    with pytest.raises(ConfigError, match=r"captured from outside.*register_buffer"):
        LinearMap(lambda x: x @ weight.T, (3,))
    # cast inside the map: accepted, and exact
    layer = LinearMap(lambda x: x @ weight.to(x.dtype).T, (3,))
    torch.testing.assert_close(layer.matrix().float(), weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "module",
    [nn.BatchNorm1d(3), nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1)), nn.InstanceNorm1d(3, affine=True)],
)
def test_modules_with_train_eval_behaviour_are_refused_by_linear_map(module):
    with pytest.raises(ConfigError, match="train and eval mode"):
        LinearMap(module, (3,))


def test_a_plain_module_is_accepted_by_linear_map():
    LinearMap(nn.Linear(3, 3), (3,))


def test_layers_of_different_dtypes_are_refused_and_one_dtype_is_the_models():
    with pytest.raises(
        ConfigError, match="mix dtypes: layer 0 \\(Dense\\) is float64, layer 2 \\(Dense\\) is float32"
    ):
        EBFlow([Dense(3).double(), SmoothLeakyReLU(0.3), Dense(3)], (3,))
    model = EBFlow([Dense(3).double(), SmoothLeakyReLU(0.3), Dense(3).double()], (3,))
    assert model.dtype == torch.float64
    assert model.log_prob(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64

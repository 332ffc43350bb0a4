"""Bad input gets a clear error naming the problem."""

from __future__ import annotations

import pytest
import torch

from ebflow import EBFlow, coupling_flow, dense_flow, make_objective
from ebflow.errors import ConfigError, InputError, SingularLayerError
from ebflow.layers import (
    ActNorm,
    AffineCoupling,
    Conv1x1,
    Conv2d,
    Dense,
    Logit,
    SmoothLeakyReLU,
    Squeeze,
)


def test_wrong_input_shape_is_named():
    model = coupling_flow(2, blocks=1)
    with pytest.raises(InputError, match=r"shape \(batch, 2\), got \(4, 3\)"):
        model.energy(torch.randn(4, 3))
    with pytest.raises(InputError, match=r"got \(2,\)"):
        model.log_prob(torch.randn(2))
    with pytest.raises(InputError, match="latent z"):
        model.inverse(torch.randn(4, 5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_rejected(bad):
    model = coupling_flow(2, blocks=1)
    x = torch.randn(4, 2)
    x[1, 0] = bad
    with pytest.raises(InputError, match="non-finite"):
        model.log_prob(x)
    with pytest.raises(InputError, match="non-finite"):
        model.score(x)


def test_dtype_and_type_mismatch_are_named():
    model = coupling_flow(2, blocks=1)
    with pytest.raises(InputError, match=r"dtype torch\.float64 but the model has dtype torch\.float32"):
        model.energy(torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(
        InputError,
        match=r"expected a floating tensor of dtype float32, got int64; "
        r"convert with x\.to\(model\.dtype\)",
    ):
        model.energy(torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(InputError, match=r"torch\.Tensor"):
        model.energy([[0.0, 1.0]])
    with pytest.raises(InputError, match="empty batch"):
        model.energy(torch.randn(0, 2))


def test_even_kernel_is_rejected():
    with pytest.raises(ConfigError, match="odd"):
        Conv2d(3, 4)


def test_non_square_dense_is_rejected():
    with pytest.raises(ConfigError, match="square"):
        Dense(4, 3)


def test_unknown_options_are_rejected():
    with pytest.raises(ConfigError, match="parameterization"):
        Dense(4, parameterization="diag")
    with pytest.raises(ConfigError, match="alpha"):
        SmoothLeakyReLU(1.5)
    with pytest.raises(ConfigError, match="not an ebflow FlowLayer"):
        EBFlow([torch.nn.Linear(2, 2)], (2,))


def test_layer_shape_mismatch_in_model_is_named():
    with pytest.raises(ConfigError, match=r"layer 1 \(Dense\)"):
        EBFlow([Dense(3), Dense(4)], (3,))
    with pytest.raises(ConfigError, match="even height and width"):
        EBFlow([Squeeze()], (1, 5, 4))
    with pytest.raises(ConfigError, match="Conv2d"):
        EBFlow([Conv2d(2, 3)], (3, 4, 4))
    with pytest.raises(ConfigError, match="AffineCoupling"):
        EBFlow([AffineCoupling((4,))], (5,))
    with pytest.raises(ConfigError, match="ActNorm"):
        EBFlow([ActNorm(3)], (4,))


@pytest.mark.parametrize("parameterization", ["full", "tril", "triu", "lu"])
def test_singular_dense_weight_gives_clear_error_when_inverting_or_sampling(parameterization):
    layer = Dense(3, parameterization=parameterization)
    with torch.no_grad():
        if parameterization == "full":
            layer.weight[2] = layer.weight[0] * 2.0
        elif parameterization == "lu":
            layer.upper[1, 1] = 0.0
        else:
            layer.weight[1, 1] = 0.0
    model = EBFlow([layer], (3,))
    with pytest.raises(SingularLayerError, match="singular"):
        model.sample(4)
    with pytest.raises(SingularLayerError, match="singular"):
        model.inverse(torch.randn(2, 3))
    with pytest.raises(SingularLayerError, match="singular"):
        model.log_prob(torch.randn(2, 3))


def test_singular_convolutions_give_clear_error():
    conv = Conv2d(1, 3)
    with torch.no_grad():
        conv.weight.zero_()
    with pytest.raises(SingularLayerError, match="singular"):
        EBFlow([conv], (1, 4, 4)).sample(2)
    conv1 = Conv1x1(2)
    with torch.no_grad():
        conv1.weight.fill_(1.0)
    with pytest.raises(SingularLayerError, match="singular"):
        EBFlow([conv1], (2, 2, 2)).sample(2)


def test_score_matching_still_works_with_a_singular_layer():
    """The energy does not need the determinant, so training is not blocked by it."""
    layer = Dense(3)
    with torch.no_grad():
        layer.weight[2] = 0.0
    model = EBFlow([layer, SmoothLeakyReLU(0.3), Dense(3)], (3,))
    assert torch.isfinite(model.energy(torch.randn(4, 3))).all()


def test_logit_outside_unit_interval_is_named():
    model = EBFlow([Logit()], (2,))
    with pytest.raises(InputError, match=r"\(0, 1\)"):
        model.energy(torch.tensor([[0.5, 1.2]]))


def test_invalid_sample_count():
    model = dense_flow((3,))
    with pytest.raises(InputError, match="positive integer"):
        model.sample(0)


def test_a_model_used_before_its_data_dependent_initialisation_names_the_fix():
    model = coupling_flow(2, blocks=1)
    x = torch.randn(4, 2)
    for use in (model.energy, model.log_prob, model.score, model.forward):
        with pytest.raises(ConfigError, match=r"not initialized: call model.initialize\(x\)"):
            use(x)
    with pytest.raises(ConfigError, match="not initialized"):
        model.sample(2)
    with pytest.raises(ConfigError, match="not initialized"):
        model.log_partition()
    model.initialize(x)
    assert torch.isfinite(model.log_prob(x)).all()


def test_sml_noise_of_the_wrong_size_is_named():
    model = dense_flow((3,))
    x = torch.randn(4, 3)
    with pytest.raises(ConfigError, match="one row of 3 latent entries"):
        make_objective("sml")(model, x, noise=torch.randn(4, 2))
    with pytest.raises(ConfigError, match="dtype and device"):
        make_objective("sml")(model, x, noise=torch.randn(4, 3, dtype=torch.float64))


def test_ml_training_loss_shows_a_singular_weight_as_a_non_finite_loss():
    """ml_loss skips the per-layer singularity checks (no device reads in a training step): an
    exactly singular weight gives an infinite loss, which the trainer's one finiteness read
    catches; model.log_prob, with or without gradients, still raises."""
    from ebflow import ml_loss

    layer = Dense(3, parameterization="tril")
    with torch.no_grad():
        layer.weight[1, 1] = 0.0
    model = EBFlow([layer], (3,))
    x = torch.randn(2, 3)
    assert torch.isinf(ml_loss(model, x).loss).all()
    with pytest.raises(SingularLayerError, match="singular"):
        model.log_prob(x)

"""ebflow's SiLU: torch's values, closed-form derivatives of every order, torch.func support,
and exactly the same objectives and gradients as ``torch.nn.SiLU`` in a Glow model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ebflow import glow_flow, make_objective
from ebflow.errors import ConfigError
from ebflow.layers import AffineCoupling, SiLU
from ebflow.layers import silu as silu_module
from ebflow.layers.silu import _SiLU, silu, silu_derivative

pytestmark = pytest.mark.usefixtures("one_thread")

LARGE = silu_module._CLOSED_FORM_MIN_ELEMENTS  # the closed forms are used from this size on


def _tower(f, x: torch.Tensor, orders: int) -> list[torch.Tensor]:
    """f(x), f'(x), ..., by repeated autograd of the element-wise function."""
    out, y = [], f(x)
    for _ in range(orders):
        out.append(y)
        (y,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    return out


def test_every_derivative_order_equals_torchs_silu():
    x = (torch.randn(LARGE, dtype=torch.float64) * 6).requires_grad_()
    ours, torchs = _tower(silu, x, 7), _tower(F.silu, x, 7)
    for order, (a, b) in enumerate(zip(ours, torchs, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13, msg=f"order {order}")
        if order:
            torch.testing.assert_close(silu_derivative(x.detach(), order), b.detach(), rtol=0, atol=1e-13)


def test_large_tensors_take_the_closed_forms_and_small_ones_torchs_silu():
    assert type(silu(torch.randn(LARGE, requires_grad=True)).grad_fn).__name__.startswith("_SiLU")
    assert type(silu(torch.randn(LARGE - 1, requires_grad=True)).grad_fn).__name__ == "SiluBackward0"


def test_custom_functions_pass_gradcheck_and_gradgradcheck():
    x = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SiLU.apply, (x,))
    assert torch.autograd.gradgradcheck(_SiLU.apply, (x,))
    assert torch.autograd.gradcheck(lambda t: silu_derivative(t, 3), (x,))
    assert torch.autograd.gradgradcheck(lambda t: silu_derivative(t, 2), (x,))


def test_torch_func_reverse_and_forward_mode():
    x = torch.randn(LARGE, dtype=torch.float64).view(256, 256)
    per_row = torch.func.vmap(torch.func.grad(lambda t: silu(t).sum()))(x)
    torch.testing.assert_close(per_row, silu_derivative(x, 1), rtol=0, atol=1e-14)
    # forward over reverse: the second derivative along ones
    _, second = torch.func.jvp(torch.func.grad(lambda t: silu(t).sum()), (x,), (torch.ones_like(x),))
    torch.testing.assert_close(second, silu_derivative(x, 2), rtol=0, atol=1e-14)
    _, third = torch.func.jvp(lambda t: silu_derivative(t, 2), (x,), (torch.ones_like(x),))
    torch.testing.assert_close(third, silu_derivative(x, 3), rtol=0, atol=1e-14)


@pytest.mark.parametrize("order", [-1, 1.0, True, "2"])
def test_a_bad_derivative_order_is_refused(order):
    with pytest.raises(ConfigError, match="derivative order"):
        silu_derivative(torch.zeros(3), order)


def test_couplings_use_it_by_default():
    layer = AffineCoupling((4, 2, 2), hidden=8)
    assert any(isinstance(m, SiLU) for m in layer.modules())
    assert not any(isinstance(m, nn.SiLU) for m in layer.modules())


@pytest.mark.parametrize(
    "name,options", [("ssm", {}), ("dsm", {"sigma": 0.1}), ("fdssm", {"eps": 0.1}), ("ml", {}), ("esm", {})]
)
def test_a_glow_model_trains_exactly_as_with_torchs_silu(name, options, monkeypatch):
    """Same loss and parameter gradients (float64) with the closed forms forced on for every
    tensor as with torch.nn.SiLU: the third-order derivatives of SSM included."""
    monkeypatch.setattr(silu_module, "_CLOSED_FORM_MIN_ELEMENTS", 0)
    torch.manual_seed(3)
    model = glow_flow((1, 4, 4), levels=2, steps=2, hidden=8).double()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    model.initialize(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    objective = make_objective(name, **options)
    results = []
    for activation in (SiLU, nn.SiLU):
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, (SiLU, nn.SiLU)):
                    setattr(module, child_name, activation())
        torch.manual_seed(5)
        loss = objective(model, x)
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_a, grads_b, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

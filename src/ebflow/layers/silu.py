r"""SiLU, :math:`f(x) = x\,\sigma(x)`, with every derivative order a closed form.

Sliced score matching differentiates a coupling layer's conditioner three times (the score, a
Hessian-vector product, then the parameters' gradient of both). Through ``torch.nn.SiLU``
autograd records the second derivative as a composite of elementwise products and the third
order replays all of them: on the Glow preset this was the largest single share of an SSM step
(the conditioners' 64-channel activations). Here the first derivative is PyTorch's fused
``silu_backward`` kernel and every higher one is a closed form whose backward is again one
product with the next order,

.. math:: \partial_x\,[g\,f^{(k)}(x)] = g\,f^{(k+1)}(x), \qquad
          p = \sigma(1-\sigma),\ q = 1 - 2\sigma,\ f'' = p\,(2 + xq),\ f''' = p\,(3q + xq^2 - 2xp),

so the same values (to rounding) cost a fixed, small number of passes per order. The forward
pass and the first backward are PyTorch's own kernels, so a plain training step costs the same.
Small tensors (under ``2**16`` elements) go through ``torch.nn.functional.silu`` unchanged.
Forward-mode differentiation (``torch.func.jvp``, ``torch.func.hessian``) works through both.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["SiLU", "silu", "silu_derivative"]

#: Highest order with a closed form below; higher orders use autograd on that form.
_MAX_CLOSED_ORDER = 4


def _closed_form(x: Tensor, order: int) -> Tensor:
    """:math:`f^{(order)}(x)` for ``order`` in 0..4, out of place (autograd may record it)."""
    s = torch.sigmoid(x)
    if order == 0:
        return x * s
    if order == 1:
        return s * torch.addcmul(torch.ones_like(x), x, 1 - s)  # s (1 + x (1 - s))
    p = torch.addcmul(s, s, s, value=-1)  # s (1 - s)
    xq = torch.addcmul(x, x, s, value=-2)  # x (1 - 2 s)
    if order == 2:
        return p * (xq + 2)
    q = torch.rsub(s, 1, alpha=2)  # 1 - 2 s
    r = torch.add(torch.addcmul(xq * q, x, p, value=-2), q, alpha=3)  # 3q + x q^2 - 2 x p
    if order == 3:
        return p * r
    # f'''' = p [q r + q^2 - 8 p - 6 x p q]
    return p * (torch.addcmul(q * (r + q), p, xq, value=-6) - 8 * p)


def silu_derivative(x: Tensor, order: int) -> Tensor:
    r""":math:`f^{(order)}(x)` of :math:`f(x) = x\sigma(x)`, ``order >= 0``, differentiable in
    ``x`` to any order (each backward is the next order's closed form)."""
    if not isinstance(order, int) or isinstance(order, bool) or order < 0:
        raise ConfigError(f"the derivative order must be an integer >= 0, got {order!r}")
    if order == 0:
        return silu(x)
    return _Derivative.apply(x, order)


def _evaluate(x: Tensor, order: int) -> Tensor:
    if order <= _MAX_CLOSED_ORDER:
        return _closed_form(x, order)
    with torch.enable_grad():  # beyond the closed forms: autograd on the highest one
        leaf = x.detach().requires_grad_(True)
        y = _closed_form(leaf, _MAX_CLOSED_ORDER)
        for _ in range(order - _MAX_CLOSED_ORDER):
            (y,) = torch.autograd.grad(y.sum(), leaf, create_graph=True)
    return y.detach()


class _Derivative(torch.autograd.Function):
    """``f^{(k)}(x)``, ``k >= 2``; backward: ``grad * f^{(k+1)}(x)``."""

    generate_vmap_rule = True  # torch.func transforms (vmap, grad, vjp) work through it

    @staticmethod
    def forward(x: Tensor, order: int) -> Tensor:
        return _evaluate(x, order)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, order = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.order = order

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad * _Derivative.apply(x, ctx.order + 1), None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor, _: None) -> Tensor:  # forward mode (e.g. torch.func.hessian)
        (x,) = ctx.saved_tensors
        return x_t * _Derivative.apply(x, ctx.order + 1)


class _SiLU(torch.autograd.Function):
    """``f(x)`` by PyTorch's kernel; backward: ``silu_backward(grad, x) = grad * f'(x)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return F.silu(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return _SiLUGrad.apply(grad, x)

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return _SiLUGrad.apply(x_t, x)


class _SiLUGrad(torch.autograd.Function):
    """``grad * f'(x)`` by PyTorch's fused kernel; backward: with respect to ``grad`` this
    function again, with respect to ``x`` ``gg * grad * f''(x)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad: Tensor, x: Tensor) -> Tensor:
        return torch.ops.aten.silu_backward(grad, x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx: Any, gg: Tensor) -> tuple[Tensor | None, Tensor | None]:
        grad, x = ctx.saved_tensors
        d_grad = _SiLUGrad.apply(gg, x) if ctx.needs_input_grad[0] else None
        d_x = gg * grad * _Derivative.apply(x, 2) if ctx.needs_input_grad[1] else None
        return d_grad, d_x

    @staticmethod
    def jvp(ctx: Any, grad_t: Tensor | None, x_t: Tensor | None) -> Tensor:
        grad, x = ctx.saved_tensors
        out = torch.zeros_like(grad) if grad_t is None else _SiLUGrad.apply(grad_t, x)
        return out if x_t is None else out + grad * x_t * _Derivative.apply(x, 2)


#: Below this many elements PyTorch's own SiLU is used: there the Python cost of the custom
#: functions (tens of microseconds a call) outweighs what they save (toy 2-D conditioners: a DSM
#: step +50 %; Glow's 64-channel activations, 0.3-1.3 M elements: an SSM step -34 %).
_CLOSED_FORM_MIN_ELEMENTS = 1 << 16


def silu(x: Tensor) -> Tensor:
    r""":math:`x\,\sigma(x)`, the values of :func:`torch.nn.functional.silu`; on tensors of
    ``2**16`` elements or more with closed-form derivatives of every order (not inside
    :func:`torch.compile`, which derives and fuses them itself: :mod:`ebflow.compiled`)."""
    if x.numel() < _CLOSED_FORM_MIN_ELEMENTS or torch.compiler.is_compiling():
        return F.silu(x)  # compiled: Inductor derives and fuses every order itself
    return _SiLU.apply(x)


class SiLU(nn.Module):
    r""":math:`x\,\sigma(x)` as :class:`torch.nn.SiLU` (no parameters, the same values), cheaper to
    differentiate two and three times: the activation of the coupling conditioners."""

    def forward(self, x: Tensor) -> Tensor:
        r""":math:`x\,\sigma(x)`, element-wise."""
        return silu(x)

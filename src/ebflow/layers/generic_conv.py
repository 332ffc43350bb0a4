r"""Convolutions ``C -> C`` built on :class:`~ebflow.layers.generic.GenericLinear`.

* :class:`GroupedConv2d` (and its special cases :class:`DepthwiseConv2d`,
  :class:`DilatedConv2d`): zero padding ``d (k // 2)`` keeps the image size; ``log|det|`` and
  the inverse come from the generic dense path (LU of the ``D x D`` matrix, ``D = C H W``).
* :class:`CircularConv2d`: periodic padding makes the map block-circulant, diagonalised by the
  2-D DFT: :math:`\hat y(\omega) = \hat K(\omega)\,\hat x(\omega)` with a ``C x C`` matrix
  :math:`\hat K(\omega)` per frequency, so
  :math:`\log|\det| = \sum_\omega \log|\det \hat K(\omega)|` in :math:`O(C^2 HW \log HW + C^3 HW)`
  and the inverse is a ``C x C`` solve per frequency -- no ``D x D`` matrix. The map itself runs
  by FFT too for kernels of 5 and more (fewer operations than a direct 7x7 convolution, and no
  slow backward-data kernel on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from .base import Example, Shape, checked_lu_factor, example_inputs, lu_solve, perturbed
from .generic import GenericLinear

__all__ = ["GroupedConv2d", "DepthwiseConv2d", "DilatedConv2d", "CircularConv2d", "circular_conv2d"]


def _image_shape(event_shape: Sequence[int], owner: str) -> tuple[int, int, int]:
    shape = tuple(event_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ConfigError(f"{owner} needs an image event shape (C, H, W), got {event_shape!r}")
    return shape


def _check_kernel(kernel_size: Any, dilation: Any, owner: str) -> None:
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(
            f"{owner}: kernel size must be a positive odd integer so that padding keeps the image "
            f"size; got {kernel_size!r}"
        )
    if not isinstance(dilation, int) or dilation < 1:
        raise ConfigError(f"{owner}: dilation must be a positive integer, got {dilation!r}")


def _identity_kernel(channels: int, per_group: int, k: int, init_noise: float) -> Tensor:
    """Kernel of shape ``(C, C / groups, k, k)`` that is the identity map plus small noise."""
    weight = torch.zeros(channels, per_group, k, k)
    weight[torch.arange(channels), torch.arange(channels) % per_group, k // 2, k // 2] = 1.0
    return weight + init_noise * torch.randn_like(weight) / k


class GroupedConv2d(GenericLinear):
    r"""Grouped, dilated convolution :math:`y = w * x + b` on images of shape ``(C, H, W)``.

    ``groups`` divides ``C`` (``groups = C``: depthwise); ``dilation`` spaces the taps; zero
    padding ``dilation * (k // 2)`` keeps the size. Initialised at the identity plus
    ``init_noise``. Cost: ``transform`` :math:`O(B\,C^2 k^2 HW / g)`; ``log|det|`` and inverse by
    the generic dense path, :math:`O(D^3)` once (cached), ``D = CHW``.
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        kernel_size: int = 3,
        *,
        groups: int = 1,
        dilation: int = 1,
        bias: bool = True,
        init_noise: float = 1e-2,
        **options: Any,
    ) -> None:
        name = type(self).__name__
        c, _, _ = _image_shape(event_shape, name)
        _check_kernel(kernel_size, dilation, name)
        if not isinstance(groups, int) or groups < 1 or c % groups:
            raise ConfigError(f"{name}: groups must be a positive divisor of {c} channels, got {groups!r}")
        super().__init__(event_shape, **options)
        self.channels, self.kernel_size, self.groups, self.dilation = c, kernel_size, groups, dilation
        self.weight = nn.Parameter(_identity_kernel(c, c // groups, kernel_size, init_noise))
        self.bias = nn.Parameter(torch.zeros(c)) if bias else None

    @classmethod
    def examples(cls) -> list[Example]:
        return [(perturbed(cls((4, 3, 3), 3, groups=2)), example_inputs(4, 4, 3, 3))]

    def extra_repr(self) -> str:
        return (
            f"event_shape={self.event_shape}, kernel_size={self.kernel_size}, "
            f"groups={self.groups}, dilation={self.dilation}, bias={self.bias is not None}"
        )

    def transform(self, x: Tensor) -> Tensor:
        self._check_event_shape(x, self.event_shape, "images")
        pad = self.dilation * (self.kernel_size // 2)
        return F.conv2d(x, self.weight, self.bias, padding=pad, dilation=self.dilation, groups=self.groups)


class DepthwiseConv2d(GroupedConv2d):
    """:class:`GroupedConv2d` with one group per channel: a ``k x k`` filter per channel."""

    def __init__(self, event_shape: Sequence[int], kernel_size: int = 3, **options: Any) -> None:
        super().__init__(
            event_shape, kernel_size, groups=_image_shape(event_shape, "DepthwiseConv2d")[0], **options
        )

    @classmethod
    def examples(cls) -> list[Example]:
        return [(perturbed(cls((2, 4, 4), 3)), example_inputs(4, 2, 4, 4))]


class DilatedConv2d(GroupedConv2d):
    """:class:`GroupedConv2d` with taps ``dilation`` pixels apart (default 2)."""

    def __init__(
        self, event_shape: Sequence[int], kernel_size: int = 3, *, dilation: int = 2, **options: Any
    ) -> None:
        super().__init__(event_shape, kernel_size, dilation=dilation, **options)

    @classmethod
    def examples(cls) -> list[Example]:
        return [(perturbed(cls((2, 5, 5), 3, dilation=2)), example_inputs(4, 2, 5, 5))]


class _CircularConv2dFunction(torch.autograd.Function):
    r"""Stride-1 convolution with periodic padding ``p`` whose input gradient is again one.

    The adjoint of a circular cross-correlation with kernel :math:`w_{oi}` is the circular
    cross-correlation with :math:`w'_{io} = w_{oi}` flipped in both spatial axes (same padding,
    same dilation). Computing it as a forward convolution avoids oneDNN's backward-data kernel,
    many times slower than the forward one for a few channels; score matching takes input
    gradients of input gradients. Differentiable to any order.
    """

    generate_vmap_rule = True  # torch.func transforms (vmap, grad, vjp) work through it

    @staticmethod
    def forward(x: Tensor, weight: Tensor, pad: int, dilation: int) -> Tensor:
        return F.conv2d(F.pad(x, (pad,) * 4, mode="circular"), weight, dilation=dilation)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, pad, dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.pad, ctx.dilation = pad, dilation

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, weight = ctx.saved_tensors
        pad, dilation = ctx.pad, ctx.dilation
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _CircularConv2dFunction.apply(grad, weight.flip(-2, -1).transpose(0, 1), pad, dilation)
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                grad,
                F.pad(x, (pad,) * 4, mode="circular"),
                weight,
                None,
                [1, 1],
                [0, 0],
                [dilation, dilation],
                False,
                [0, 0],
                1,
                [False, True, False],
            )[1]
        return grad_x, grad_w, None, None


def circular_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, dilation: int = 1) -> Tensor:
    r"""``conv2d`` of ``x`` with periodic padding ``dilation * (k // 2)`` (odd ``k``):
    :math:`y_o[n] = \sum_{i, t} w_{oi}[t]\, x_i[(n + d (t - k//2)) \bmod (H, W)] + b_o`."""
    pad = dilation * (weight.shape[-1] // 2)
    if torch.compiler.is_compiling():  # Dynamo drops the custom function's higher derivatives
        y = F.conv2d(F.pad(x, (pad,) * 4, mode="circular"), weight, dilation=dilation)
    else:
        y = _CircularConv2dFunction.apply(x, weight, pad, dilation)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


class CircularConv2d(GenericLinear):
    r"""Convolution with periodic (circular) padding, ``C -> C`` channels, on ``(C, H, W)`` images.

    The map is block-circulant; with the 2-D DFT :math:`\hat K(\omega)` (a ``C x C`` matrix per
    frequency :math:`\omega`) of the kernel wrapped onto the ``H x W`` torus,

    .. math:: \log|\det| = \sum_\omega \log|\det \hat K(\omega)|, \qquad
              x = \mathcal F^{-1}\big[\hat K(\omega)^{-1}\, \mathcal F(y - b)(\omega)\big].

    ``transform`` runs either as a direct convolution with periodic padding (``method="direct"``,
    :math:`O(B\,C^2 k^2 HW)`) or by FFT, :math:`y = \mathcal F^{-1}[\hat K \hat x] + b`
    (``"fft"``, :math:`O(B\,(C\,HW \log HW + C^2 HW))`); ``"auto"`` takes the FFT for
    ``k >= 5``. Cost: ``log|det|`` :math:`O(C^2 HW \log HW + C^3 HW)`
    (FFT and ``HW`` complex LUs, cached); inverse :math:`O(B\,(C\,HW \log HW + C^2 HW))`. No dense
    matrix, so no limit on ``D`` (``max_dim`` bounds only the reference :meth:`matrix`).
    Requires ``dilation * (k // 2) <= min(H, W)``; taps that wrap onto the same pixel add up.
    """

    dense = False

    def __init__(
        self,
        event_shape: Sequence[int],
        kernel_size: int = 3,
        *,
        dilation: int = 1,
        bias: bool = True,
        init_noise: float = 1e-2,
        method: Literal["auto", "fft", "direct"] = "auto",
        **options: Any,
    ) -> None:
        c, h, w = _image_shape(event_shape, "CircularConv2d")
        if method not in ("auto", "fft", "direct"):
            raise ConfigError(f"CircularConv2d: method must be auto, fft or direct, got {method!r}")
        _check_kernel(kernel_size, dilation, "CircularConv2d")
        if dilation * (kernel_size // 2) > min(h, w):
            raise ConfigError(
                f"CircularConv2d: padding dilation * (k // 2) = {dilation * (kernel_size // 2)} "
                f"would wrap around a {h} x {w} image more than once; use a smaller kernel or dilation"
            )
        super().__init__(event_shape, **options)
        self.channels, self.kernel_size, self.dilation = c, kernel_size, dilation
        self.method = ("fft" if kernel_size >= 5 else "direct") if method == "auto" else method
        self.weight = nn.Parameter(_identity_kernel(c, c, kernel_size, init_noise))
        self.bias = nn.Parameter(torch.zeros(c)) if bias else None

    @classmethod
    def examples(cls) -> list[Example]:
        return [
            (perturbed(cls((2, 4, 4), 3)), example_inputs(4, 2, 4, 4)),
            (perturbed(cls((2, 6, 6), 5, method="fft")), example_inputs(4, 2, 6, 6)),
            (perturbed(cls((1, 5, 5), 3, dilation=2, bias=False)), example_inputs(4, 1, 5, 5)),
        ]

    def extra_repr(self) -> str:
        return (
            f"event_shape={self.event_shape}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, bias={self.bias is not None}, method={self.method}"
        )

    def transform(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.event_shape:
            raise InputError(
                f"CircularConv2d expects images of shape (batch, {', '.join(map(str, self.event_shape))}), "
                f"got {tuple(x.shape)}"
            )
        if self.method == "direct":
            return circular_conv2d(x, self.weight, self.bias, self.dilation)
        _, h, w = self.event_shape
        spectrum = torch.fft.rfft2(self._torus(self.weight.to(x.dtype)))  # (C, C, H, W // 2 + 1)
        y = torch.fft.irfft2(torch.einsum("oiuv,biuv->bouv", spectrum, torch.fft.rfft2(x)), s=(h, w))
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def _torus(self, weight: Tensor) -> Tensor:
        r"""The kernel as ``C x C`` images on the ``H x W`` torus: tap ``t`` at offset
        :math:`-d (t - k//2) \bmod (H, W)`, wrapped taps added up; differentiable."""
        c, h, w = self.event_shape
        k, d = self.kernel_size, self.dilation
        offsets = torch.arange(k, device=weight.device) - k // 2
        rows, cols = (-d * offsets) % h, (-d * offsets) % w
        where = (rows.view(k, 1) * w + cols.view(1, k)).reshape(-1)
        torus = torch.zeros(c, c, h * w, dtype=weight.dtype, device=weight.device)
        return torus.index_add(2, where, weight.reshape(c, c, k * k)).view(c, c, h, w)

    def spectrum(self) -> Tensor:
        r""":math:`\hat K(\omega)`, complex128 of shape ``(H, W, C, C)``: the 2-D DFT of the
        kernel on the torus; differentiable. Cost :math:`O(C^2 HW \log HW)`."""
        return torch.fft.fft2(self._torus(self.weight.double())).permute(2, 3, 0, 1)

    logdet_from_factors = True  # the HW complex C x C LUs of the spectrum

    def _log_abs_det(self, event_shape: Shape) -> Tensor:
        return torch.linalg.slogdet(self.spectrum())[1].sum()

    def _factorize(self, event_shape: Shape) -> tuple[Tensor, Tensor]:
        return checked_lu_factor(self.spectrum(), f"CircularConv2d(k={self.kernel_size})")

    def _inverse_with(self, factors: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
        self._check_event_shape(y, self.event_shape, "outputs")
        lu, pivots = factors
        rhs = y.double() if self.bias is None else y.double() - self.bias.double().view(1, -1, 1, 1)
        spec = torch.fft.fft2(rhs).permute(2, 3, 1, 0)  # (H, W, C, B)
        x = torch.fft.ifft2(lu_solve(lu, pivots, spec).permute(3, 2, 0, 1)).real
        return x.to(y.dtype).contiguous()

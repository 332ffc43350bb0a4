"""Convolutions ``C -> C`` with zero padding that keeps the spatial size.

A zero-padded convolution on a ``C x H x W`` image is a linear map ``y = M x + b`` with a
``D x D`` matrix ``M`` (``D = C H W``). The forward pass is a plain ``conv2d``. The exact
``log|det M|`` and the inverse are computed from ``M`` itself -- built by convolving the identity
basis -- and its LU factorisation, in float64, only when asked for, and cached until the weights
change. For ``D = 3072`` this is one ``3072 x 3072`` LU: a few seconds on two CPU cores.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from .base import Example, LinearFlowLayer, Shape, checked_lu_factor, example_inputs, lu_solve, perturbed
from .dense import random_orthogonal

__all__ = ["Conv2d", "Conv1x1", "convolution_matrix", "same_padding_conv2d"]


def convolution_matrix(weight: Tensor, image_shape: Shape) -> Tensor:
    """The ``D x D`` matrix ``M`` of ``x -> conv2d(x, weight, padding=k//2)`` on ``image_shape``.

    ``M[(o, y, x), (i, y + a - k//2, x + b - k//2)] = weight[o, i, a, b]`` (indices flattened in
    C-order) wherever the input pixel lies inside the image: the kernel entries are placed, not
    multiplied, so ``M`` is exact and costs ``O(C^2 k^2 H W)`` besides its zeros (convolving the
    ``D`` basis images instead costs ``O(D C k^2 H W)``). Differentiable in ``weight``.
    """
    c, h, w = image_shape
    d, hw, k = c * h * w, h * w, weight.shape[-1]
    out_pixel, in_pixel, taps = _valid_taps(h, w, k, weight.device)
    channel = torch.arange(c, device=weight.device)
    # flat index of M[(o, out_pixel), (i, in_pixel)], shape (o, i, tap position)
    index = (
        channel.view(c, 1, 1) * (hw * d)
        + channel.view(1, c, 1) * hw
        + (out_pixel * d + in_pixel).view(1, 1, -1)
    )
    values = weight.reshape(c, c, k * k)[:, :, taps]
    flat = torch.zeros(d * d, dtype=weight.dtype, device=weight.device)
    return flat.index_put((index.reshape(-1),), values.reshape(-1)).view(d, d)


@functools.lru_cache(maxsize=32)
def _valid_taps(h: int, w: int, k: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Every (output pixel ``y w + x``, input pixel ``y' w + x'``, tap ``a k + b``) of a
    ``k x k`` kernel with zero padding ``k // 2`` whose input pixel lies inside the image."""
    p = k // 2
    a, b, y, x = torch.meshgrid(*(torch.arange(n, device=device) for n in (k, k, h, w)), indexing="ij")
    ys, xs = y + a - p, x + b - p
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    return (y * w + x)[inside], (ys * w + xs)[inside], (a * k + b)[inside]


class _SamePaddingConv2d(torch.autograd.Function):
    r"""``conv2d(x, w, b, padding=k // 2)`` whose input gradient is again a forward convolution.

    With stride 1 and size-preserving zero padding, :math:`\partial L/\partial x = w' *
    \partial L/\partial y`, where :math:`w'_{io} = w_{oi}` flipped in both spatial axes.
    oneDNN's dedicated backward-data kernel is 4-20x slower than its forward kernel for 1-4
    channels (a 7x7 kernel on MNIST or CIFAR), which dominates score matching on the CNN models:
    every score is an input gradient, and its own gradient again. The weight gradient is
    PyTorch's. Differentiable to any order: the input gradient is this function again.
    """

    generate_vmap_rule = True  # torch.func transforms (vmap, grad, vjp) work through it

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _SamePaddingConv2d.apply(grad, weight.flip(-2, -1).transpose(0, 1), None)
        if ctx.needs_input_grad[1]:
            pad = weight.shape[-1] // 2
            grad_w = torch.ops.aten.convolution_backward(
                grad,
                x,
                weight,
                None,
                [1, 1],
                [pad, pad],
                [1, 1],
                False,
                [0, 0],
                1,
                [False, True, False],
            )[1]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b


#: Up to this many channels, CPU convolutions take their input gradient from a forward
#: convolution (:func:`same_padding_conv2d`); above it oneDNN's own kernel is as fast, and the
#: custom function's unconditional weight gradient would cost more than it saves.
_FEW_CHANNELS = 4
#: the reference initialises a -I kernel's bias with the std of Xavier-normal noise of this gain
NEGATIVE_IDENTITY_BIAS_GAIN = 0.01


def same_padding_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Stride-1 convolution with zero padding ``k // 2`` (odd ``k``): same output size."""
    if torch.compiler.is_compiling():  # Dynamo drops the custom function's higher derivatives
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)
    return _SamePaddingConv2d.apply(x, weight, bias)


class Conv2d(LinearFlowLayer):
    r"""Convolution :math:`y = w * x + b` with ``C`` channels in and out, any odd kernel size.

    Zero padding of ``k // 2`` keeps the spatial size, so the layer is a square linear map
    :math:`y = M x + b` of the flattened image; :math:`\log|\det M|` and :math:`M^{-1}` come from
    an LU factorisation of :math:`M` (cached). Initialised at the identity kernel plus small
    noise (``init_noise``), or with ``init="negative_identity"`` at exactly :math:`-I` with a
    bias :math:`\sim N(0, s^2)`, :math:`s = 0.01 \sqrt{2 / (2 C k^2)} = 0.01 / (k \sqrt{C})`: the
    std of the reference's Xavier-normal kernel noise of gain 0.01, which sets its bias's std
    (0.0014 for 1 channel and 7x7 kernels, 0.0004 for 16 channels).

    Cost (``D = C H W``): ``transform`` :math:`O(B C^2 k^2 H W)`; ``log|det|`` and the inverse
    through the ``D x D`` convolution matrix: an LU, :math:`O(D^3)`, once per parameter state
    (cached, shared by ``log Z`` and sampling) or, with gradients (maximum likelihood), a
    ``slogdet`` at every call; inverse :math:`O(B D^2)` per call.

    **Spectral normalisation** (``spectral_norm=True``, the reference's CIFAR-CNN recipe for ML,
    SSM and DSM): ``weight`` becomes :func:`torch.nn.utils.parametrizations.spectral_norm` of a
    free parameter (``parametrizations.weight.original``): the kernel reshaped to a
    ``C x (C k k)`` matrix divided by its largest singular value :math:`\sigma`, estimated by
    power iteration with the vectors ``u``, ``v`` kept as buffers (in the state dict).
    Everything -- ``transform``, the exact ``log|det M|``, the inverse, sampling -- uses the
    *normalised* weight, so the flow stays exact for the map it applies. (This normalises the
    reshaped kernel, not the operator norm of the convolution, which can still exceed 1.)

    * In **train mode every access to** ``weight`` **runs one power-iteration step** (updating
      ``u`` and ``v`` in place), so the map changes slightly between calls, as in the reference.
      ebflow's objectives and :meth:`~ebflow.EBFlow.log_prob` evaluate it once per call
      (:func:`torch.nn.utils.parametrize.cached`): one power step per layer and training step,
      and one map for the whole loss. The cached ``log|det|`` and factorisation follow the
      buffers (their version counters are part of the cache key), so nothing stale is served.
    * In **eval mode** the weight is a fixed function of the parameter and the buffers: the
      density, the inverse and the samples are exactly consistent (call ``model.eval()`` before
      evaluating an exact likelihood or sampling).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        *,
        bias: bool = True,
        init_noise: float = 1e-2,
        init: str = "identity",
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(
                f"Conv2d kernel size must be a positive odd integer so that zero padding keeps "
                f"the image size; got {kernel_size!r}"
            )
        if not isinstance(channels, int) or channels < 1:
            raise ConfigError(f"Conv2d needs a positive number of channels, got {channels!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        if init not in ("identity", "negative_identity"):
            raise ConfigError(f"unknown Conv2d initialisation {init!r}; choose identity or negative_identity")
        weight = torch.zeros(channels, channels, kernel_size, kernel_size)
        centre = kernel_size // 2
        if init == "identity":
            weight[:, :, centre, centre] = torch.eye(channels)
            weight += init_noise * torch.randn_like(weight) / kernel_size
            start_bias = torch.zeros(channels)
        else:
            weight[:, :, centre, centre] = -torch.eye(channels)
            start_bias = NEGATIVE_IDENTITY_BIAS_GAIN / (kernel_size * channels**0.5) * torch.randn(channels)
        if not isinstance(spectral_norm, bool):
            raise ConfigError(f"Conv2d spectral_norm must be True or False, got {spectral_norm!r}")
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(start_bias) if bias else None
        self.spectral_norm = spectral_norm
        if spectral_norm:
            nn.utils.parametrizations.spectral_norm(self, "weight")

    @classmethod
    def examples(cls) -> list[Example]:
        return [
            (perturbed(cls(2, 3)), example_inputs(5, 2, 4, 4)),
            (perturbed(cls(1, 5, init="negative_identity")), example_inputs(5, 1, 5, 5)),
            (perturbed(cls(2, 3, spectral_norm=True)).eval(), example_inputs(5, 2, 4, 4)),
        ]

    def extra_repr(self) -> str:
        sn = ", spectral_norm=True" if self.spectral_norm else ""
        return f"channels={self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}{sn}"

    def output_shape(self, event_shape: Shape) -> Shape:
        if len(event_shape) != 3 or event_shape[0] != self.channels:
            raise InputError(
                f"Conv2d({self.channels} channels) expects images of shape "
                f"(batch, {self.channels}, H, W), got event shape {tuple(event_shape)}"
            )
        return tuple(event_shape)

    def transform(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise InputError(
                f"Conv2d({self.channels} channels) expects images of shape "
                f"(batch, {self.channels}, H, W), got {tuple(x.shape)}"
            )
        weight = self.weight  # one access: with spectral_norm in train mode, one power step
        if x.device.type == "cpu" and self.channels <= _FEW_CHANNELS:
            return same_padding_conv2d(x, weight, self.bias)
        return F.conv2d(x, weight, self.bias, padding=self.kernel_size // 2)

    def matrix(self, image_shape: Shape) -> Tensor:
        """The layer's ``D x D`` matrix on images of shape ``image_shape`` (float64), from the
        weight that :meth:`transform` uses (the normalised one with ``spectral_norm``)."""
        return convolution_matrix(self.weight.double(), tuple(image_shape))

    logdet_from_factors = True

    def _log_abs_det(self, event_shape: Shape) -> Tensor:
        return torch.linalg.slogdet(self.matrix(event_shape))[1]

    def _factorize(self, event_shape: Shape) -> tuple[Tensor, Tensor]:
        return checked_lu_factor(self.matrix(event_shape), f"Conv2d(k={self.kernel_size})")

    def _inverse_with(self, factors: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
        lu, pivots = factors
        b = y.shape[0]
        rhs = y if self.bias is None else y - self.bias.view(1, -1, 1, 1)
        x = lu_solve(lu, pivots, rhs.reshape(b, -1).double().T)
        return x.T.reshape(y.shape).to(y.dtype)


class Conv1x1(LinearFlowLayer):
    r"""Invertible 1x1 convolution: the same ``C x C`` matrix :math:`W` at every pixel.

    :math:`\log|\det| = H W \log|\det W|`; the inverse solves with :math:`W` at every pixel.
    Orthogonal initialisation.

    Cost: ``transform`` :math:`O(B C^2 H W)`; ``log|det|`` :math:`O(C^3)` (cached without
    gradients); inverse :math:`O(C^3)` once (cached LU) plus :math:`O(B C^2 H W)` per call.
    """

    def __init__(self, channels: int, *, bias: bool = False) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ConfigError(f"Conv1x1 needs a positive number of channels, got {channels!r}")
        self.channels = channels
        self.weight = nn.Parameter(random_orthogonal(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    @classmethod
    def examples(cls) -> list[Example]:
        return [
            (perturbed(cls(3)), example_inputs(5, 3, 2, 2)),
            (perturbed(cls(2, bias=True)), example_inputs(5, 2, 3, 3)),
        ]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, bias={self.bias is not None}"

    def output_shape(self, event_shape: Shape) -> Shape:
        if len(event_shape) != 3 or event_shape[0] != self.channels:
            raise InputError(
                f"Conv1x1({self.channels} channels) expects images of shape "
                f"(batch, {self.channels}, H, W), got event shape {tuple(event_shape)}"
            )
        return tuple(event_shape)

    def transform(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise InputError(
                f"Conv1x1({self.channels} channels) expects images of shape "
                f"(batch, {self.channels}, H, W), got {tuple(x.shape)}"
            )
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)

    logdet_from_factors = True

    def _log_abs_det(self, event_shape: Shape) -> Tensor:
        _, h, w = event_shape
        return h * w * torch.linalg.slogdet(self.weight)[1]

    def _log_abs_det_of_factors(self, factors: tuple[Tensor, Tensor], event_shape: Shape) -> Tensor:
        _, h, w = event_shape  # the C x C factors describe the map at each of the H W pixels
        return h * w * super()._log_abs_det_of_factors(factors, event_shape)

    def _factorize(self, event_shape: Shape) -> tuple[Tensor, Tensor]:
        return checked_lu_factor(self.weight.double(), f"Conv1x1({self.channels})")

    def _inverse_with(self, factors: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
        lu, pivots = factors
        b, c, h, w = y.shape
        rhs = y if self.bias is None else y - self.bias.view(1, -1, 1, 1)
        rhs = rhs.double().permute(1, 0, 2, 3).reshape(c, -1)
        x = lu_solve(lu, pivots, rhs)
        return x.reshape(c, b, h, w).permute(1, 0, 2, 3).to(y.dtype).contiguous()

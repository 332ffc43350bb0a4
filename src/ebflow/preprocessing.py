r"""Parameter-free image preprocessing and "match after preprocessing" (MaP).

Pixels :math:`x \in \{0, \dots, 255\}` are dequantised, :math:`\tilde x = x + u`,
:math:`u \sim U[0, 1)`, then mapped to

.. math:: y = \operatorname{logit}\big(\delta + (1 - 2\delta)\,\tilde x / 256\big) / \kappa

with shift :math:`\delta` (1e-6) and smoothness factor :math:`\kappa` (0.5 for FC models,
0.75 for CNN models, as in the paper's recipes; the inverse is a sigmoid of slope
:math:`\kappa`). The map is a fixed
bijection of :math:`(0, 256)^D` with a log-determinant, so an exact NLL in data space is

.. math:: -\log p(\tilde x) = -\log p_{model}(y) - \log|\det \partial y / \partial \tilde x|.

With MaP the preprocessing sits outside the model and the score-matching loss is computed on
:math:`y`; without MaP (the ablation) the same maps become the model's first layers
(:meth:`ImagePreprocessing.as_layers`) and the loss sees :math:`\tilde x`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError
from .layers import FixedAffine, FlowLayer, Logit
from .utils import sum_except_batch
from .validation import check_batch, check_count, check_generator, check_number

__all__ = ["ImagePreprocessing"]


class ImagePreprocessing:
    """Dequantise, scale to (0, 1), shift and apply a smoothed logit (see module docstring).

    Args:
        smoothness: the factor :math:`\\kappa > 0`.
        shift: :math:`\\delta \\in [0, 0.5)`.
        num_bins: number of pixel levels (256 for 8-bit images).

    Example:
        >>> import torch
        >>> from ebflow import ImagePreprocessing
        >>> pre = ImagePreprocessing(smoothness=0.5)
        >>> pixels = torch.randint(0, 256, (2, 1, 4, 4)).double()
        >>> x = pre.dequantize(pixels)  # x + u, u ~ U[0, 1)
        >>> y, log_det = pre(x)         # the model sees y (MaP); one log-determinant per image
        >>> log_det.shape
        torch.Size([2])
        >>> torch.allclose(pre.inverse(y), x), torch.equal(pre.to_pixels(y), pixels)
        (True, True)
    """

    def __init__(self, smoothness: float = 0.5, shift: float = 1e-6, num_bins: int = 256) -> None:
        self.smoothness = check_number(smoothness, "logit smoothness", positive=True)
        self.shift = check_number(shift, "logit shift", non_negative=True, below=0.5)
        self.num_bins = check_count(num_bins, "num_bins", minimum=2)

    def __repr__(self) -> str:
        return (
            f"ImagePreprocessing(smoothness={self.smoothness}, shift={self.shift}, num_bins={self.num_bins})"
        )

    def dequantize(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        r""":math:`\tilde x = x + u`, :math:`u \sim U[0, 1)`; pixels (integer or floating
        tensor, a batch first) must be in ``[0, num_bins)``."""
        check_batch(pixels, what="pixels", integer_ok=True)
        check_generator(generator, device=pixels.device, owner="pixel batch")
        if not pixels.is_floating_point():
            pixels = pixels.to(torch.get_default_dtype())
        if bool((pixels < 0).any()) or bool((pixels > self.num_bins - 1).any()):
            raise InputError(
                f"pixel values must lie in [0, {self.num_bins - 1}], got range "
                f"[{float(pixels.min())}, {float(pixels.max())}]"
            )
        u = torch.rand(pixels.shape, dtype=pixels.dtype, device=pixels.device, generator=generator)
        return pixels + u

    def _unit(self, x: Tensor) -> Tensor:
        return self.shift + (1 - 2 * self.shift) * x / self.num_bins

    def forward(self, x: Tensor, *, check: bool = True) -> tuple[Tensor, Tensor]:
        r"""Map dequantised pixels :math:`\tilde x \in (0, 256)` to :math:`y`; returns ``(y, log|det|)``.

        ``check=False`` skips the range check (values slightly outside ``[0, num_bins]`` still
        map to finite ``y`` thanks to the shift)."""
        check_batch(x, what="dequantised pixels x", finite=check)
        if check and (bool((x < 0).any()) or bool((x > self.num_bins).any())):
            raise InputError(
                f"dequantised pixels must lie in [0, {self.num_bins}], got range "
                f"[{float(x.min())}, {float(x.max())}]"
            )
        p = self._unit(x)
        log_p, log_1mp = torch.log(p), torch.log1p(-p)
        y = (log_p - log_1mp) / self.smoothness
        per_entry = math.log((1 - 2 * self.shift) / (self.smoothness * self.num_bins)) - log_p - log_1mp
        return y, sum_except_batch(per_entry)

    __call__ = forward

    def inverse(self, y: Tensor) -> Tensor:
        r"""Back to continuous pixels :math:`\tilde x \in (0, 256)`."""
        check_batch(y, what="preprocessed y", finite=False)  # NaN/Inf samples map to NaN/edges
        p = torch.sigmoid(y * self.smoothness)
        return (p - self.shift) * self.num_bins / (1 - 2 * self.shift)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(x, log|det dx/dy|)`` for the inverse map, computed stably with log-sigmoids:
        :math:`\log\frac{dx}{dy} = \log\frac{\kappa n}{1 - 2\delta} + \log\sigma(\kappa y) + \log\sigma(-\kappa y)`."""
        check_batch(y, what="preprocessed y", finite=False)
        t = y * self.smoothness
        x = (torch.sigmoid(t) - self.shift) * self.num_bins / (1 - 2 * self.shift)
        per_entry = (
            math.log(self.smoothness * self.num_bins / (1 - 2 * self.shift))
            + F.logsigmoid(t)
            + F.logsigmoid(-t)
        )
        return x, sum_except_batch(per_entry)

    def to_pixels(self, y: Tensor) -> Tensor:
        """Back to integer-valued pixels in ``[0, num_bins - 1]`` (floor of :meth:`inverse`)."""
        return self.inverse(y).floor().clamp(0, self.num_bins - 1)

    def as_layers(self) -> list[FlowLayer]:
        """The same map as flow layers, to put inside a model (the no-MaP ablation)."""
        return [
            FixedAffine((1 - 2 * self.shift) / self.num_bins, self.shift),
            Logit(),
            FixedAffine(1.0 / self.smoothness),
        ]

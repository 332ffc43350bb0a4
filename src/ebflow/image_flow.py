r"""A flow over images with its likelihood and samples in **pixel space**.

A model trained on preprocessed images sees :math:`y = f(\tilde x)`, the smoothed logit of the
dequantised pixels :math:`\tilde x = x + u`, :math:`u \sim U[0, 1)^D` (see
:mod:`ebflow.preprocessing`). Its own ``log_prob(y)`` is a density of :math:`y`, not of images; the
density of the pixels adds the preprocessing's log-determinant:

.. math:: \log p(\tilde x) = \log p_{model}(f(\tilde x)) + \log|\det \partial f / \partial \tilde x|.

:class:`ImageFlow` carries the model and its preprocessing together, so that ``log_prob``,
``nll`` and ``sample`` are in pixel space. Its ``nll`` is the number ``ebflow eval`` reports for
the same weights, noise seed and batch size (one implementation serves both).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .errors import InputError
from .flow import EBFlow
from .preprocessing import ImagePreprocessing
from .runtime import full_precision
from .utils import step_seed
from .validation import check_batch, check_count, check_generator

__all__ = ["ImageFlow"]


class ImageFlow(nn.Module):
    r"""An :class:`~ebflow.EBFlow` over images together with its :class:`~ebflow.ImagePreprocessing`.

    ``log_prob`` and ``nll`` are exact densities of dequantised pixels (nats per image; bits/dim
    :math:`= \text{nll} / (D \ln 2)`), ``sample`` returns pixel levels.

    Args:
        flow: the model. With ``use_map=True`` (MaP, the paper's default) it models the
            preprocessed :math:`y`; with ``use_map=False`` its first layers are the
            preprocessing itself (:meth:`ImagePreprocessing.as_layers`) and it models
            :math:`\tilde x` directly.
        preprocessing: the map the flow was trained with (its ``num_bins`` gives the pixel levels).
        use_map: whether the preprocessing sits outside the flow (see ``flow``).

    Example:
        >>> import torch, ebflow
        >>> flow = ebflow.dense_flow((1, 8, 8), num_layers=2)
        >>> images = ebflow.ImageFlow(flow, ebflow.ImagePreprocessing(num_bins=17))
        >>> pixels = torch.randint(0, 17, (4, 1, 8, 8)).float()
        >>> images.log_prob(images.dequantize(pixels)).shape
        torch.Size([4])
        >>> images.sample(3).shape
        torch.Size([3, 1, 8, 8])
    """

    def __init__(self, flow: EBFlow, preprocessing: ImagePreprocessing, *, use_map: bool = True) -> None:
        super().__init__()
        if not isinstance(flow, EBFlow):
            raise InputError(f"flow must be an ebflow.EBFlow, got {type(flow).__name__}")
        if not isinstance(preprocessing, ImagePreprocessing):
            raise InputError(
                f"preprocessing must be an ebflow.ImagePreprocessing, got {type(preprocessing).__name__}"
            )
        self.flow = flow
        self.preprocessing = preprocessing
        self.use_map = bool(use_map)

    def __repr__(self) -> str:
        return f"ImageFlow(use_map={self.use_map}, preprocessing={self.preprocessing!r}, flow={self.flow!r})"

    @property
    def num_bins(self) -> int:
        """Pixel levels: pixels are integers in ``[0, num_bins - 1]``."""
        return self.preprocessing.num_bins

    @property
    def event_shape(self) -> tuple[int, ...]:
        """Shape of one image, e.g. ``(1, 28, 28)``."""
        return tuple(self.flow.event_shape)

    # -- from pixels to the model's input ---------------------------------------------------
    def dequantize(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        r""":math:`\tilde x = x + u`, :math:`u \sim U[0, 1)`, for integer pixel levels ``pixels``."""
        return self.preprocessing.dequantize(pixels, generator=generator)

    def model_input(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        r"""What the flow is trained on: :math:`f(x + u)` with MaP, :math:`x + u` without, on the
        flow's device and dtype. Train with ``objective(image_flow.flow, image_flow.model_input(x))``."""
        x = self.dequantize(pixels, generator=generator)
        if self.use_map:
            x = self.preprocessing.forward(x)[0]
        return x.to(self.flow.device, self.flow.dtype)

    # -- exact likelihood in pixel space ----------------------------------------------------
    @full_precision()
    def log_prob(self, x: Tensor) -> Tensor:
        r"""Exact :math:`\log p(\tilde x)` of dequantised pixels ``x`` in ``[0, num_bins]``, shape
        ``(batch,)``: the flow's log-density plus the preprocessing's log-determinant (MaP);
        the preprocessing runs in float64."""
        check_batch(x, what="dequantised pixels x")
        if not self.use_map:
            return self.flow.log_prob(x.to(self.flow.device, self.flow.dtype)).double()
        y, log_det = self.preprocessing.forward(x.to(torch.float64))
        log_p = self.flow.log_prob(y.to(self.flow.device, self.flow.dtype))
        return log_p.double() + log_det.to(log_p.device)

    @torch.no_grad()
    def nll(self, pixels: Tensor, *, seed: int = 0, batch_size: int = 500) -> dict[str, float]:
        r"""Exact negative log-likelihood of integer pixels under uniform dequantisation:
        ``{'nll': nats per image, 'bpd': nll / (D ln 2), 'n': images}``, with
        :math:`\text{nll} = -\frac1n \sum_i \log p(x_i + u_i)`.

        The noise of batch ``k`` (rows ``[k B, (k+1) B)``) comes from a CPU generator seeded by
        ``(seed, k)``: the same ``seed`` and ``batch_size`` give the same number on any device,
        and ``ebflow eval`` reports this number (``LoadedRun.eval_seed`` and the config's
        ``eval_batch_size``). Another seed changes it by the dequantisation noise only."""
        batch_size = check_count(batch_size, "batch_size", minimum=1)
        total, n = self.sum_log_prob(pixels, seed=seed, batch_size=batch_size)
        nll = -total / n if n else math.nan
        return {"nll": nll, "bpd": nll / (math.prod(self.event_shape) * math.log(2)), "n": n}

    def sum_log_prob(
        self,
        pixels: Tensor,
        *,
        seed: int = 0,
        batch_size: int = 500,
        include: Callable[[int], bool] | None = None,
    ) -> tuple[float, int]:
        r"""``(\sum_i \log p(x_i + u_i), n)`` over the batches ``k`` of ``pixels`` (of
        ``batch_size`` rows) for which ``include(k)`` holds (all by default), with the noise of
        :meth:`nll`. Data-parallel evaluation sums these over processes."""
        check_batch(pixels, self.event_shape, what="pixels", integer_ok=True, owner="image flow")
        total, n = 0.0, 0
        with torch.no_grad():
            for k, batch in enumerate(pixels.split(batch_size)):
                if include is not None and not include(k):
                    continue
                g = torch.Generator().manual_seed(step_seed(seed, k))
                x = self.dequantize(batch.to("cpu", torch.float64), generator=g)
                total += float(self.log_prob(x).sum())
                n += batch.shape[0]
        return total, n

    # -- sampling in pixel space --------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self, sample_shape: int | Sequence[int] = (), *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Exact samples as pixel levels (floats in ``[0, num_bins - 1]``), shape
        ``(*sample_shape, *event_shape)``: the flow's samples mapped back through the
        preprocessing and floored (the inverse of dequantisation)."""
        check_generator(generator, device=self.flow.device)
        x = self.flow.sample(sample_shape, generator=generator)
        return self.to_pixels(x)

    def to_pixels(self, x: Tensor) -> Tensor:
        """The flow's input space (``y`` with MaP, ``x + u`` without) -> pixel levels in
        ``[0, num_bins - 1]`` (NaN -> 0, infinities -> the edges: a diverged model still gives
        an image)."""
        dtype = x.dtype
        x = torch.nan_to_num(x.double(), nan=0.0, posinf=1e6, neginf=-1e6)
        if self.use_map:
            return self.preprocessing.to_pixels(x).to(dtype)
        return x.floor().clamp(0, self.num_bins - 1).to(dtype)

r"""Inpainting with the energy: fill masked pixels by Langevin MCMC on the conditional law.

Given an image with a set :math:`M` of missing pixels, the chain samples
:math:`p(x_M \mid x_{\bar M}) \propto e^{-E(x)}`: only the masked coordinates move (see
:mod:`ebflow.mcmc`). Chains run in the preprocessed space :math:`y = P(\tilde x)` of
:class:`~ebflow.ImagePreprocessing`, where the logit removes the pixel range's boundaries:

* MaP models (preprocessing outside the model) use their own energy on :math:`y`;
* models with the preprocessing inside (no MaP) use the energy of :math:`y`,
  :math:`E_y(y) = E(P^{-1}y) + \log|\det \partial P / \partial \tilde x|`.

The masked region starts from uniform pixel noise; results are mapped back to pixels and the
observed pixels are copied from the input. The mean squared error over the masked region
(pixels scaled to ``[0, 1]``) is reported for the start (noise) and the filled images.

This module opens no file: the command line ``ebflow inpaint RUN_DIR --mask ... --steps N --out
FILE.png`` (:mod:`ebflow.cli.inpaint`) reads mask images and writes the grid with
:mod:`ebflow.experiment.images.inpainting`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, InputError
from .images import image_grid
from .mcmc import PreprocessedSpaceEnergy, check_energy_model, default_step_size, langevin
from .mcmc.energy import EnergyModel, check_preprocessing
from .preprocessing import ImagePreprocessing
from .validation import check_batch, check_count, check_generator, check_number

__all__ = [
    "InpaintResult",
    "PreprocessedSpaceEnergy",
    "MASK_REGIONS",
    "make_mask",
    "inpaint_images",
    "inpainting_grid",
]

MASK_REGIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")


# -- masks -----------------------------------------------------------------------------------
def _image_hw(event_shape: Sequence[int], spec: str) -> tuple[int, int]:
    if len(event_shape) == 3:
        return int(event_shape[1]), int(event_shape[2])
    if len(event_shape) == 2:
        return int(event_shape[0]), int(event_shape[1])
    raise InputError(
        f"mask {spec!r} needs image events (C, H, W) or (H, W); got event shape {tuple(event_shape)}"
    )


def _expand_to_event(plane: Tensor, event_shape: Sequence[int]) -> Tensor:
    """A ``(..., H, W)`` boolean plane broadcast to every channel of the event."""
    if len(event_shape) == 3:
        return plane.unsqueeze(-3).expand(*plane.shape[:-2], *event_shape)
    return plane


def _mask_plane(plane: Any, hw: tuple[int, int]) -> Tensor:
    """A boolean ``(H, W)`` plane from a tensor or array mask (nonzero = fill)."""
    try:
        plane = torch.as_tensor(np.asarray(plane.detach().cpu() if isinstance(plane, Tensor) else plane))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"a mask array must be numeric or boolean: {err}") from None
    if plane.dim() != 2 or tuple(plane.shape) != hw:
        raise InputError(
            f"a mask array must have the data images' height and width {hw[0]}x{hw[1]} (HxW), "
            f"got shape {tuple(plane.shape)}"
        )
    plane = plane != 0
    if not bool(plane.any()):
        raise InputError("the mask has no pixel to fill")
    return plane


def make_mask(
    spec: str | Tensor | np.ndarray,
    event_shape: Sequence[int],
    *,
    batch: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Boolean mask, ``True`` on the pixels to fill, from a specification:

    * ``center`` -- the central square of half the height and width;
    * ``left`` / ``right`` / ``top`` / ``bottom`` -- that half of the image;
    * ``random:P`` -- each pixel independently with probability ``P`` (per image);
    * a tensor or array of the data's height and width ``(H, W)`` -- its nonzero (``True``)
      pixels (the command line reads one from a ``FILE.png``:
      :func:`ebflow.experiment.images.inpainting.read_mask_png`).

    Image masks cover every channel of a pixel. Returns shape ``event_shape``, or
    ``(batch, *event_shape)`` for ``random:P``.
    """
    if not isinstance(spec, (str, Tensor, np.ndarray)):
        raise ConfigError(
            f"mask spec must be a string (a region or random:P) or an (H, W) tensor or array, "
            f"got {type(spec).__name__}"
        )
    if isinstance(event_shape, (str, bytes)) or not hasattr(event_shape, "__iter__"):
        raise ConfigError(f"event_shape must be a sequence of sizes, got {event_shape!r}")
    event_shape = tuple(check_count(s, "every size of event_shape") for s in event_shape)
    batch = check_count(batch, "mask batch")
    check_generator(generator, device="cpu", owner="mask (drawn on the CPU, then moved)")
    if not isinstance(spec, str):
        plane = _mask_plane(spec, _image_hw(event_shape, "array"))
        return _expand_to_event(plane, event_shape).clone()
    if spec.startswith("random:"):
        try:
            p = float(spec.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"random mask needs a probability, e.g. random:0.5; got {spec!r}") from None
        if not 0 < p <= 1:
            raise ConfigError(f"random mask probability must be in (0, 1], got {p}")
        if len(event_shape) in (2, 3):
            h, w = _image_hw(event_shape, spec)
            plane = torch.rand((batch, h, w), generator=generator) < p
            return _expand_to_event(plane, event_shape).clone()
        return torch.rand((batch, *event_shape), generator=generator) < p
    h, w = _image_hw(event_shape, spec)
    if spec in MASK_REGIONS:
        plane = torch.zeros(h, w, dtype=torch.bool)
        if spec == "center":
            plane[h // 4 : h - h // 4, w // 4 : w - w // 4] = True
        elif spec == "left":
            plane[:, : w // 2] = True
        elif spec == "right":
            plane[:, w // 2 :] = True
        elif spec == "top":
            plane[: h // 2, :] = True
        else:
            plane[h // 2 :, :] = True
    else:
        raise ConfigError(
            f"unknown mask {spec!r}; use one of {', '.join(MASK_REGIONS)}, random:P or an (H, W) tensor"
        )
    return _expand_to_event(plane, event_shape).clone()


# -- inpainting ------------------------------------------------------------------------------
@dataclass
class InpaintResult:
    """Pixels ``(batch, *event_shape)`` in ``[0, 255]`` and the masked-region errors.

    Attributes:
        original: the input images.
        start: the images the chains start from (noise in the masked region).
        filled: the inpainted images (observed pixels copied from ``original``).
        mask: boolean, ``True`` on the filled pixels, shape ``(batch, *event_shape)``.
        mse_before: mean squared error of ``start`` against ``original`` over the masked
            pixels, pixels scaled to [0, 1].
        mse_after: the same for ``filled``.
        mse_chain: the same for the chain's last state alone, before the optional denoising
            step and averaging (equal to ``mse_after`` without them).
        acceptance_rate: MALA acceptance (``None`` for unadjusted Langevin).
        step_size: median step size of the last iteration.
    """

    original: Tensor
    start: Tensor
    filled: Tensor
    mask: Tensor
    mse_before: float
    mse_after: float
    mse_chain: float
    acceptance_rate: float | None
    step_size: float


def masked_mse(a: Tensor, b: Tensor, mask: Tensor, max_value: float) -> float:
    """Mean of ``((a - b) / max_value)^2`` over the masked entries."""
    diff = ((a - b) / max_value).pow(2)
    return float(diff[mask].mean())


def _full_mask(mask: Tensor, original: Tensor, event_shape: tuple[int, ...]) -> Tensor:
    """The mask broadcast to the images' shape (boolean, on their device)."""
    if not isinstance(mask, Tensor):
        raise InputError(f"mask must be a boolean torch.Tensor, got {type(mask).__name__}")
    try:
        if torch.broadcast_shapes(mask.shape, original.shape) != original.shape or mask.dim() < len(
            event_shape
        ):
            raise RuntimeError
    except RuntimeError:
        raise InputError(
            f"mask of shape {tuple(mask.shape)} does not match images of shape {tuple(original.shape)}"
        ) from None
    return mask.to(device=original.device, dtype=torch.bool).expand(original.shape).clone()


def _chain_start(
    model,
    preprocessing: ImagePreprocessing | None,
    original: Tensor,
    full_mask: Tensor,
    map_space: bool,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, EnergyModel, float]:
    """``(y0, start, target, max_value)``: the chains' first state in the space they run in
    (noise on the masked pixels), the same start in pixels, the energy model the chains use,
    and the pixel range for the errors."""
    dtype, device = original.dtype, original.device
    if preprocessing is not None:
        top = preprocessing.num_bins - 1
        if bool((original < 0).any()) or bool((original > top).any()):
            raise InputError(
                f"images must be pixels in [0, {top}], got range [{float(original.min())}, "
                f"{float(original.max())}]"
            )
        noise = (
            torch.rand(original.shape, generator=generator, device=device).to(dtype) * preprocessing.num_bins
        )
        start_cont = torch.where(full_mask, noise, original + 0.5)  # mid-bin for observed pixels
        y0, _ = preprocessing.forward(start_cont)
        start = torch.where(full_mask, noise.floor().clamp(0, top), original)
        target = model if map_space else PreprocessedSpaceEnergy(model, preprocessing)
        return y0, start, target, float(top)
    mean = original.mean(dim=0, keepdim=True)
    spread = (
        original.std(dim=0, keepdim=True).clamp_min(1e-3) if original.shape[0] > 1 else torch.ones_like(mean)
    )
    noise = mean + spread * torch.randn(original.shape, generator=generator, device=device).to(dtype)
    y0 = torch.where(full_mask, noise, original)
    span = float(original.max() - original.min())
    return y0, y0.clone(), model, span if span > 0 else 1.0


def inpaint_images(
    model,
    preprocessing: ImagePreprocessing | None,
    images: Tensor,
    mask: Tensor,
    *,
    steps: int = 500,
    step_size: float | None = None,
    metropolis: bool = True,
    target_acceptance: float | None = 0.574,
    schedule: str = "constant",
    final_step_size: float | None = None,
    smoothness: float = 0.0,
    blur_sigma: float = 1.0,
    map_space: bool = True,
    denoise_sigma: float = 0.0,
    average_last: int = 0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> InpaintResult:
    r"""Fill the ``mask``-ed pixels of ``images`` by Langevin MCMC with ``model``'s energy.

    Args:
        model: an EBFlow (only ``energy`` is used).
        preprocessing: the run's :class:`~ebflow.ImagePreprocessing`; ``None`` when the data are
            not images, then chains run on the raw values and the noise start is Gaussian with the
            batch's mean and spread.
        images: pixels ``(batch, *event_shape)`` in ``[0, num_bins - 1]``.
        mask: boolean, ``True`` on the pixels to fill; ``event_shape`` or ``(batch, *event_shape)``.
        steps: MCMC iterations. With ``step_size``, ``metropolis``, ``target_acceptance``,
            ``schedule``, ``final_step_size``, ``smoothness`` and ``blur_sigma``: the chain's
            settings (:func:`ebflow.mcmc.langevin`). ``step_size=None`` starts from
            :func:`ebflow.mcmc.default_step_size`; adaptation applies to MALA only.
        map_space: ``True`` when the model was trained on the preprocessed tensor (MaP);
            ``False`` when the preprocessing is the model's first layers.
        denoise_sigma: if > 0, finish with one Tweedie step :math:`y + \sigma^2\nabla\log p(y)`
            on the masked coordinates. A model trained by DSM at noise ``sigma`` fits the data
            blurred by that noise, so its chains end noisy; this step removes the noise.
        average_last: if > 0, the fill is the average (in pixels) of the chain's last
            ``average_last`` states (each denoised as above when ``denoise_sigma > 0``): an
            estimate of the posterior mean, which has a lower squared error than one sample but
            looks blurrier. ``0`` returns the last state: one sample of the conditional law.
        generator: random generator on the model's device, for the noise start and the chains
            (:class:`~ebflow.errors.InputError` when it is on another device).
    """
    model = check_energy_model(model)
    if preprocessing is not None:
        check_preprocessing(preprocessing)
    steps = check_count(steps, "steps", minimum=0)
    if step_size is not None:
        step_size = check_number(step_size, "step size", positive=True)
    denoise_sigma = check_number(denoise_sigma, "denoise_sigma", non_negative=True)
    average_last = check_count(average_last, "average_last", minimum=0)
    check_generator(generator, device=getattr(model, "device", torch.device("cpu")))
    if average_last > steps:
        raise ConfigError(f"average_last ({average_last}) cannot exceed the number of steps ({steps})")
    event_shape = tuple(model.event_shape)
    check_batch(images, event_shape, what="images", integer_ok=True)
    dtype = getattr(model, "dtype", torch.get_default_dtype())
    device = getattr(model, "device", torch.device("cpu"))
    original = images.detach().to(device=device, dtype=dtype)
    full_mask = _full_mask(mask, original, event_shape)
    y0, start, target, max_value = _chain_start(
        model, preprocessing, original, full_mask, map_space, generator
    )

    if step_size is None:
        step_size = default_step_size(target, y0, full_mask)
    adapt = target_acceptance if metropolis else None

    def to_values(y: Tensor) -> Tensor:
        """Continuous values in data space (pixels before flooring)."""
        return preprocessing.inverse(y) if preprocessing is not None else y

    def denoised(y: Tensor, grad_u: Tensor | None = None) -> Tensor:
        r"""Tweedie step :math:`y - \sigma^2 \nabla E(y)` on the masked coordinates."""
        if grad_u is None or smoothness > 0:  # the step uses the model's energy only
            with torch.enable_grad():
                yg = y.detach().requires_grad_(True)
                (grad_u,) = torch.autograd.grad(target.energy(yg).sum(), yg)
        return torch.where(full_mask, y - denoise_sigma**2 * grad_u, y).detach()

    average = torch.zeros_like(original)

    def accumulate(i: int, y: Tensor, grad_u: Tensor) -> None:
        if i >= steps - average_last:
            average.add_(to_values(denoised(y, grad_u) if denoise_sigma > 0 else y) / average_last)

    result = langevin(
        target,
        y0,
        steps,
        step_size,
        metropolis=metropolis,
        mask=full_mask,
        schedule=schedule,
        final_step_size=final_step_size,
        target_acceptance=adapt,
        smoothness=smoothness,
        blur_sigma=blur_sigma,
        generator=generator,
        progress=progress,
        callback=accumulate if average_last else None,
    )
    y = result.samples

    def to_filled(y: Tensor) -> Tensor:
        values = preprocessing.to_pixels(y) if preprocessing is not None else y
        return torch.where(full_mask, values, original)

    def pixels_from_values(values: Tensor) -> Tensor:
        if preprocessing is not None:
            values = values.floor().clamp(0, preprocessing.num_bins - 1)
        return torch.where(full_mask, values, original)

    mse_chain = masked_mse(to_filled(y), original, full_mask, max_value)
    if average_last:  # noqa: SIM108 - clearer than a nested conditional expression
        filled = pixels_from_values(average)
    else:
        filled = to_filled(denoised(y) if denoise_sigma > 0 else y)
    return InpaintResult(
        original=original,
        start=start,
        filled=filled,
        mask=full_mask,
        mse_before=masked_mse(start, original, full_mask, max_value),
        mse_after=masked_mse(filled, original, full_mask, max_value),
        mse_chain=mse_chain,
        acceptance_rate=result.acceptance_rate,
        step_size=float(result.step_size.median()),
    )


def inpainting_grid(result: InpaintResult, *, max_value: float = 255.0, min_size: int = 64) -> Tensor:
    """The picture of an inpainting as one ``(C, H, W)`` image with values in ``[0, 1]``: rows
    original / masked (noise start) / filled, one column per image, gray padding between them
    (:func:`ebflow.images.image_grid`; single-channel images are drawn as three equal channels).
    ``ebflow inpaint`` writes it to a picture file.

    Small images are enlarged by an integer factor (nearest neighbour) to at least ``min_size``
    pixels high.
    """
    if not isinstance(result, InpaintResult):
        raise ConfigError(f"inpainting_grid needs an InpaintResult, got {type(result).__name__}")
    max_value = check_number(max_value, "max_value", positive=True)
    min_size = check_count(min_size, "min_size")
    rows = [result.original, result.start, result.filled]
    images = torch.cat(rows).detach().cpu().float() / max_value
    if images.dim() == 3:  # (H, W) events -> one channel
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise InputError(f"can only draw image events (C, H, W) or (H, W); got {tuple(rows[0].shape[1:])}")
    factor = max(1, math.ceil(min_size / images.shape[-2]))
    if factor > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    return image_grid(images.clamp(0, 1), nrow=result.original.shape[0], padding=2, pad_value=0.5)

"""Energies that MCMC chains target: the model's, in the preprocessed space, and the Gaussian
smoothness prior of images."""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, InputError
from ..utils import sum_except_batch
from ..validation import check_batch, check_number

__all__ = [
    "EnergyModel",
    "PreprocessedSpaceEnergy",
    "check_energy_model",
    "check_preprocessing",
    "gaussian_blur",
    "smoothness_energy",
]


@runtime_checkable
class EnergyModel(Protocol):
    """Anything with an ``energy(x) -> (batch,)`` method and an ``event_shape`` (e.g. EBFlow)."""

    event_shape: tuple[int, ...]

    def energy(self, x: Tensor) -> Tensor:
        """Energy :math:`E(x)` per example, shape ``(batch,)``; its gradient drives the chains."""
        ...


def check_energy_model(model: object) -> EnergyModel:
    """Return ``model`` if it has a callable ``energy`` and an ``event_shape``, else raise."""
    energy = getattr(model, "energy", None)
    if not callable(energy) or getattr(model, "event_shape", None) is None:
        raise ConfigError(
            f"MCMC needs a model with an energy (an ebflow.EBFlow or an object with "
            f"energy(x) and event_shape); got {type(model).__name__}"
        )
    return model  # type: ignore[return-value]


def check_preprocessing(preprocessing: object) -> None:
    """Raise :class:`ConfigError` unless ``preprocessing`` looks like an
    :class:`~ebflow.ImagePreprocessing` (``forward``, ``inverse``, ``inverse_and_log_det``)."""
    if not all(
        callable(getattr(preprocessing, m, None)) for m in ("forward", "inverse", "inverse_and_log_det")
    ):
        raise ConfigError(
            f"preprocessing must be an ebflow.ImagePreprocessing (or None), got {type(preprocessing).__name__}"
        )


class PreprocessedSpaceEnergy:
    r"""Energy of :math:`y = P(\tilde x)` for a model whose input is dequantised pixels
    :math:`\tilde x` (image preprocessing :math:`P` inside the model, no MaP):
    :math:`E_y(y) = E(P^{-1} y) - \log|\det \partial P^{-1}/\partial y|`, with the log-determinant
    from :meth:`ImagePreprocessing.inverse_and_log_det`.

    Chains on :math:`y` cannot leave the model's pixel range, which chains on :math:`\tilde x` can.
    """

    def __init__(self, model: EnergyModel, preprocessing) -> None:
        self.model = check_energy_model(model)
        check_preprocessing(preprocessing)
        self.preprocessing = preprocessing
        self.event_shape = tuple(model.event_shape)

    def to_logit_space(self, x: Tensor) -> Tensor:
        r""":math:`y = P(\tilde x)` (no range check beyond the model's own: its support is
        slightly wider than :math:`[0, n]`)."""
        return self.preprocessing.forward(x, check=False)[0]

    def energy(self, y: Tensor) -> Tensor:
        r"""The model's energy carried to the preprocessed space:
        :math:`E_y(y) = E(\tilde x) + \log|\det \partial P/\partial \tilde x|`, :math:`\tilde x = P^{-1}y`."""
        x, log_det = self.preprocessing.inverse_and_log_det(y)
        return self.model.energy(x) - log_det


# -- smoothness prior ------------------------------------------------------------------------
def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    radius = max(1, math.ceil(2 * sigma))
    r = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: Tensor, sigma: float = 1.0) -> Tensor:
    r"""Separable Gaussian blur :math:`Bx` of images ``(batch, C, H, W)`` (per channel,
    replicate padding, kernel radius :math:`\lceil 2\sigma \rceil`). A fixed linear map of ``x``.

    Kept rather than ``torchvision.transforms.v2.functional.gaussian_blur``: the kernel is the
    same (tested), but torchvision pads by reflection, which changes the smoothness energy at
    the borders and fails on images not larger than the kernel radius."""
    check_batch(x, what="gaussian_blur input x", finite=False)
    if x.dim() != 4:
        raise InputError(f"gaussian_blur expects (batch, C, H, W), got {tuple(x.shape)}")
    sigma = check_number(sigma, "blur sigma", positive=True)
    c = x.shape[1]
    k = _gaussian_kernel(sigma, x.dtype, x.device)
    r = (k.numel() - 1) // 2
    h = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(
        F.pad(h, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c
    )


def smoothness_energy(x: Tensor, event_shape: tuple[int, ...], weight: float, sigma: float) -> Tensor:
    r""":math:`\tfrac{\lambda}{2}\|x - Bx\|^2` per example."""
    img = x if len(event_shape) == 3 else x.unsqueeze(1)
    diff = img - gaussian_blur(img, sigma)
    return 0.5 * weight * sum_except_batch(diff.pow(2))

"""Element-wise affine layers with constant Jacobian: ActNorm and a fixed scaling."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from .base import Example, LinearFlowLayer, Shape, example_inputs, perturbed

__all__ = ["ActNorm", "FixedAffine"]

#: The error of a layer used before its data-dependent initialisation.
_NOT_INITIALIZED = (
    "ActNorm is not initialized: call model.initialize(x) with a batch of data before training "
    "or evaluating (or load a state dict saved after initialisation)"
)


#: How ActNorm learns its per-channel scale: its logarithm (``"log"``) or the scale itself
#: (``"linear"``, as the reference code's toy model).
ACTNORM_SCALES: tuple[str, ...] = ("log", "linear")


class ActNorm(LinearFlowLayer):
    r"""Per-channel affine map :math:`y = (x + \beta) e^{s}` with learned :math:`\beta, s`
    (``scale="log"``), or :math:`y = (x + \beta)\, a` with learned :math:`a` (``scale="linear"``:
    the same maps, another parameterisation, hence other optimiser steps; the reference's toy
    model), :math:`\log|\det| = (\text{pixels per channel}) \sum_c \log|a_c|`.

    Channels are dimension 1 (features for vectors, channels for images).
    :math:`\log|\det| = (\text{pixels per channel}) \sum_c s_c`.

    Data-dependent initialisation is explicit: :meth:`initialize` (usually through
    :meth:`ebflow.EBFlow.initialize`) sets :math:`\beta, s` so that the output of a batch has
    zero mean and unit variance per channel, and sets the ``initialized`` buffer. Until then,
    using the layer (``transform``, ``forward``, ``inverse``, ``log_abs_det``) raises
    :class:`~ebflow.errors.ConfigError`; a state dict saved after initialisation restores the
    flag with the parameters.

    Cost: ``transform`` and inverse :math:`O(B D)`; ``log|det|`` :math:`O(C)`.
    """

    initialized: Tensor  # buffer: bool, set by initialize()
    caches_derived_values = False  # log|det| is a sum over channels: cheaper than a cache key
    #: a Python copy of a True ``initialized`` buffer (class default for pickled older modules)
    _known_initialized: bool = False

    def __init__(self, channels: int, *, eps: float = 1e-6, scale: str = "log") -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ConfigError(f"ActNorm needs a positive number of channels, got {channels!r}")
        if scale not in ACTNORM_SCALES:
            raise ConfigError(f"unknown ActNorm scale {scale!r}; choose {' or '.join(ACTNORM_SCALES)}")
        self.channels = channels
        self.eps = eps
        self.scale_parameterization = scale
        self.shift = nn.Parameter(torch.zeros(channels))
        if scale == "log":
            self.log_scale = nn.Parameter(torch.zeros(channels))
        else:
            self.scale = nn.Parameter(torch.ones(channels))
        self.register_buffer("initialized", torch.tensor(False))
        self._known_initialized = False

    @classmethod
    def examples(cls) -> list[Example]:
        examples: list[Example] = []
        for shape, scale in (((3,), "log"), ((2, 3, 3), "log"), ((3,), "linear"), ((2, 3, 3), "linear")):
            x = example_inputs(6, *shape)
            layer = cls(shape[0], scale=scale).double()
            layer.initialize(x)
            examples.append((perturbed(layer), x))
        return examples

    def extra_repr(self) -> str:
        linear = ", scale='linear'" if self.scale_parameterization == "linear" else ""
        return f"channels={self.channels}{linear}"

    def _multiplier(self) -> Tensor:
        """The per-channel scale :math:`e^{s}` or :math:`a`."""
        return self.log_scale.exp() if self.scale_parameterization == "log" else self.scale

    def _log_abs_multiplier(self) -> Tensor:
        """:math:`s` or :math:`\\log|a|` per channel."""
        return self.log_scale if self.scale_parameterization == "log" else self.scale.abs().log()

    def _view(self, t: Tensor, ndim: int) -> Tensor:
        return t.view(1, -1, *([1] * (ndim - 2)))

    def output_shape(self, event_shape: Shape) -> Shape:
        if len(event_shape) < 1 or event_shape[0] != self.channels:
            raise InputError(
                f"ActNorm({self.channels}) expects inputs with {self.channels} channels in "
                f"dimension 1, got event shape {tuple(event_shape)}"
            )
        return tuple(event_shape)

    # -- data-dependent initialisation -------------------------------------------------------
    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set shift and log-scale so that ``transform(x)`` has zero mean and unit variance per
        channel (statistics over the batch and the pixels), and mark the layer initialised."""
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[1] != self.channels:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(
                f"ActNorm({self.channels}) initializes from inputs with {self.channels} channels "
                f"in dimension 1, got {got}"
            )
        if x.numel() < 2 * self.channels:
            raise InputError(
                f"ActNorm({self.channels}) needs at least two values per channel to initialize "
                f"(a batch of two examples or more), got shape {tuple(x.shape)}"
            )
        dims = [0] + list(range(2, x.dim()))
        x = x.detach()
        mean = x.mean(dim=dims)
        std = x.std(dim=dims)
        if not bool(torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise InputError(f"ActNorm({self.channels}) cannot initialize from non-finite data")
        self.shift.copy_(-mean)
        if self.scale_parameterization == "log":
            self.log_scale.copy_(-torch.log(std + self.eps))
        else:
            self.scale.copy_(1.0 / (std + self.eps))
        self.initialized.fill_(True)
        self._known_initialized = True

    @property
    def requires_initialization(self) -> bool:
        return not (self._known_initialized or bool(self.initialized))

    def _check_initialized(self) -> None:
        # ``_known_initialized`` caches a True flag: no device sync per call once initialised.
        if not self._known_initialized:
            if not bool(self.initialized):
                raise ConfigError(_NOT_INITIALIZED)
            self._known_initialized = True

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._known_initialized = False  # re-read the loaded ``initialized`` buffer
        super()._load_from_state_dict(*args, **kwargs)

    # -- the map ------------------------------------------------------------------------------
    def transform(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise InputError(
                f"ActNorm({self.channels}) expects inputs with {self.channels} channels in "
                f"dimension 1, got shape {tuple(x.shape)}"
            )
        self._check_initialized()
        return (x + self._view(self.shift, x.dim())) * self._view(self._multiplier(), x.dim())

    def log_abs_det(self, event_shape: Shape) -> Tensor:
        self._check_initialized()
        return super().log_abs_det(event_shape)

    def inverse(self, y: Tensor) -> Tensor:
        self._check_initialized()
        return super().inverse(y)

    def _log_abs_det(self, event_shape: Shape) -> Tensor:
        return math.prod(event_shape[1:]) * self._log_abs_multiplier().sum()

    def _factorize(self, event_shape: Shape) -> None:
        return None

    def _inverse_with(self, factors: None, y: Tensor) -> Tensor:
        return y / self._view(self._multiplier(), y.dim()) - self._view(self.shift, y.dim())


class FixedAffine(LinearFlowLayer):
    r"""Fixed element-wise map :math:`y = a x + b` (no parameters); :math:`\log|\det| = D \log|a|`.

    Cost: ``transform`` and inverse :math:`O(B D)`; ``log|det|`` :math:`O(1)`."""

    caches_derived_values = False  # nothing worth a cache key

    def __init__(self, scale: float, shift: float = 0.0) -> None:
        super().__init__()
        if not math.isfinite(scale) or scale == 0.0 or not math.isfinite(shift):
            raise ConfigError(f"FixedAffine needs a finite non-zero scale, got scale={scale}, shift={shift}")
        self.scale = float(scale)
        self.shift = float(shift)

    @classmethod
    def examples(cls) -> list[Example]:
        return [(cls(-2.5, 0.5), example_inputs(5, 3)), (cls(0.25), example_inputs(5, 1, 2, 2))]

    def extra_repr(self) -> str:
        return f"scale={self.scale}, shift={self.shift}"

    def transform(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift

    def _log_abs_det(self, event_shape: Shape) -> Tensor:
        return torch.tensor(math.prod(event_shape) * math.log(abs(self.scale)), dtype=torch.float64)

    def _factorize(self, event_shape: Shape) -> None:
        return None

    def _inverse_with(self, factors: None, y: Tensor) -> Tensor:
        return (y - self.shift) / self.scale

"""Base classes of flow layers.

Every layer is a bijection ``x -> y`` with ``forward(x) -> (y, log|det J|)`` (one value per
example) and an exact ``inverse(y)``. Layers split in two sets (DESIGN.md §1):

* :class:`LinearFlowLayer` -- constant Jacobian. ``transform(x)`` computes ``y`` alone and
  ``log_abs_det(event_shape)`` gives the constant log-determinant, so that the energy can leave
  it out and the exact likelihood can add it back (``log Z = -sum log|det|``).
* :class:`FlowLayer` (the rest) -- input-dependent Jacobian; its log-determinant is part of the
  energy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar, overload

import torch
from torch import Tensor, nn

from ..errors import InputError, SingularLayerError
from .cache import ParameterCache, needs_grad

__all__ = [
    "FlowLayer",
    "LinearFlowLayer",
    "Shape",
    "Example",
    "lu_solve",
    "checked_lu_factor",
    "unchecked_singularity",
    "singularity_checked",
    "check_pivots",
    "example_inputs",
    "perturbed",
]

Shape = tuple[int, ...]
#: A layer and a batch of inputs in its domain (see :meth:`FlowLayer.examples`).
Example = tuple["FlowLayer", Tensor]


def example_inputs(*shape: int, seed: int = 0) -> Tensor:
    """A float64 batch of standard normal inputs of shape ``shape`` (a fixed seed)."""
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


_M = TypeVar("_M", bound=nn.Module)


def perturbed(layer: _M, scale: float = 0.1, seed: int = 0) -> _M:
    """``layer`` in float64 with ``scale * N(0, 1)`` added to every floating parameter, so that
    no parameter sits at its (often identity-like or zero) initial value."""
    g = torch.Generator().manual_seed(seed)
    layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            if p.is_floating_point():
                p.add_(scale * torch.randn(p.shape, dtype=p.dtype, generator=g))
    return layer


class FlowLayer(nn.Module):
    """A bijective layer: ``forward(x) -> (y, log|det dy/dx|)`` and ``inverse(y) -> x``.

    ``x`` has shape ``(batch, *event_shape)``; the log-determinant has shape ``(batch,)``.
    """

    #: True for layers whose Jacobian does not depend on the input (the set S_lin).
    constant_jacobian: bool = False

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """``(y, log|det dy/dx|)`` for a batch ``x``: ``y`` of shape ``(batch, *output_shape)``
        and one log-determinant per example, shape ``(batch,)``."""
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The exact inverse: ``x`` with ``forward(x)[0] == y`` (up to rounding)."""
        raise NotImplementedError

    @classmethod
    def examples(cls) -> list[Example]:
        """Small float64 instances of this layer, each with a batch of inputs in its domain, and
        parameters away from their initial values. The layer contract test
        (``tests/test_layer_contract.py``) checks every exported layer on them -- exact
        log-determinant, inverse, cache refresh, no determinant work in score matching, dtypes
        -- so a new layer is covered by giving it this method. Every concrete layer overrides it."""
        raise NotImplementedError(
            f"{cls.__name__} has no examples(): give it one so that the layer contract test covers it"
        )

    def initialize(self, x: Tensor) -> None:
        """Data-dependent initialisation from ``x``, a batch of this layer's inputs (e.g.
        :class:`~ebflow.layers.ActNorm`); a no-op for the other layers. Usually called for the
        whole model by :meth:`ebflow.EBFlow.initialize`."""

    @property
    def requires_initialization(self) -> bool:
        """True while the layer has a data-dependent initialisation that has neither run nor
        been loaded from a state dict (using the layer then raises a clear error)."""
        return False

    def in_domain(self, x: Tensor) -> Tensor | None:
        """Per-example mask (``(batch,)``, bool) of inputs inside the layer's domain, or ``None``
        when the layer is defined everywhere (the default)."""
        return None

    def output_shape(self, event_shape: Shape) -> Shape:
        """Event shape of the output for an input of event shape ``event_shape``.

        Raises :class:`InputError` when the layer cannot act on that shape.
        """
        return tuple(event_shape)

    def _check_event_shape(self, x: Tensor, expected: Shape, what: str) -> None:
        if tuple(x.shape[1:]) != tuple(expected):
            raise InputError(
                f"{type(self).__name__} expects {what} of shape (batch, "
                f"{', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )


def checked_lu_factor(matrix: Tensor, owner: str) -> tuple[Tensor, Tensor]:
    """LU factorisation ``P L U = matrix`` that raises :class:`SingularLayerError` when singular.

    A matrix counts as singular when a pivot is zero, non-finite, or smaller than
    ``n * eps * max|pivot|`` (its condition number is beyond the dtype's precision).
    """
    lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
    check_pivots(lu.diagonal(dim1=-2, dim2=-1), owner, failed=info.max() > 0)
    return lu, pivots


_SINGULARITY_UNCHECKED: ContextVar[bool] = ContextVar("ebflow_singularity_unchecked", default=False)


@contextmanager
def unchecked_singularity() -> Iterator[None]:
    """Inside, log-determinants computed *with gradients* skip their singularity checks (pivots,
    finiteness), which read the device once or twice per linear layer: a training objective
    (maximum likelihood) uses it and leaves a singular weight to show as a non-finite loss.
    Values computed without gradients (evaluation, sampling) are always checked."""
    token = _SINGULARITY_UNCHECKED.set(True)
    try:
        yield
    finally:
        _SINGULARITY_UNCHECKED.reset(token)


def singularity_checked() -> bool:
    """False inside :func:`unchecked_singularity` (for layers' differentiable log-determinants)."""
    return not _SINGULARITY_UNCHECKED.get()


def check_pivots(pivots: Tensor, owner: str, failed: Tensor | None = None) -> None:
    """Raise :class:`SingularLayerError` unless every pivot (diagonal of a triangular factor) is
    finite and larger than ``n * eps * max|pivot|`` (and ``failed``, a factorisation's own
    verdict, is false). One device read."""
    diag = pivots.detach().abs()
    eps = torch.finfo(diag.dtype).eps
    nonfinite = ~torch.isfinite(diag).all()
    if failed is not None:
        nonfinite = nonfinite | failed
    tiny = (diag <= diag.numel() * eps * diag.max()).any()
    singular, ill_conditioned = torch.stack([nonfinite, tiny]).tolist()  # the one device read
    if singular:
        raise SingularLayerError(f"{owner}: weight matrix is singular; it cannot be inverted")
    if ill_conditioned:
        raise SingularLayerError(
            f"{owner}: weight matrix is numerically singular (smallest pivot "
            f"{float(diag.min()):.3e}, largest {float(diag.max()):.3e}); it cannot be inverted"
        )


def lu_solve(lu: Tensor, pivots: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``A x = rhs`` for the columns of ``rhs`` given ``lu_factor(A)``."""
    return torch.linalg.lu_solve(lu, pivots, rhs)


class LinearFlowLayer(FlowLayer):
    """A layer with constant Jacobian: ``y = A x + b``.

    Subclasses implement :meth:`transform` (``y`` without any determinant),
    :meth:`_log_abs_det` (differentiable ``log|det A|`` for an input event shape),
    :meth:`_factorize` (whatever the inverse needs, e.g. an LU factorisation; ``None`` if
    nothing) and :meth:`_inverse_with` (the inverse given those factors).

    The log-determinant and the factorisation are cached and reused until a parameter or
    buffer of the layer (or of a sub-module) changes; a computation that must carry gradients
    is never served from the cache. The policy and its key are those of
    :class:`~ebflow.layers.cache.ParameterCache`; :meth:`clear_cache` empties it. **This class
    makes the gradient-vs-cache decision** (:meth:`log_abs_det`): with gradients needed it calls
    :meth:`_log_abs_det`; without, and with :attr:`logdet_from_factors`, it reads the
    determinant off the cached factors that :meth:`inverse` uses (one factorisation serves
    ``log Z`` and sampling); otherwise it caches :meth:`_log_abs_det` computed under ``no_grad``.
    """

    constant_jacobian = True
    #: Read ``log|det A|`` (without gradients) off the cached factors of :meth:`_factorize`,
    #: through :meth:`_log_abs_det_of_factors`. For layers whose factorisation is the costly
    #: part (a dense or block LU); closed-form determinants (triangular, diagonal, permutation)
    #: leave it False.
    logdet_from_factors: bool = False
    #: Keep ``log|det A|`` and the factors in the :class:`~ebflow.layers.cache.ParameterCache`.
    #: False for layers whose derived values cost no more than one pass over the parameters (a
    #: diagonal, masked triangles): the cache's key alone (a float64 sum and norm of every
    #: parameter and buffer, at every call) would cost more than the value, so it is computed
    #: at every call instead (Dense "lu" at D = 3,072: the keys took 60 % of an ML step).
    caches_derived_values: bool = True

    def __init__(self) -> None:
        super().__init__()
        self._cache = ParameterCache()

    # -- to implement -------------------------------------------------------------------
    def transform(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``y = A x + b``; never computes a determinant, inverse or factorisation."""
        raise NotImplementedError

    def _log_abs_det(self, event_shape: Shape) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _factorize(self, event_shape: Shape) -> Any:  # pragma: no cover - abstract
        """Whatever :meth:`_inverse_with` needs (e.g. an LU factorisation); may be cached."""
        raise NotImplementedError

    def _inverse_with(self, factors: Any, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- caching (the policy lives in ebflow.layers.cache) ---------------------------------
    def _needs_grad(self) -> bool:
        """True when a value computed now must carry gradients (never served from the cache)."""
        return needs_grad(self)

    def _cached(self, name: str, event_shape: Shape, compute: Callable[[], Any]) -> Any:
        """``compute()`` through this layer's :class:`~ebflow.layers.cache.ParameterCache` (with
        :attr:`caches_derived_values`), else computed now (under ``no_grad`` unless gradients
        are needed)."""
        if self.caches_derived_values:
            return self._cache.get(name, event_shape, compute, self)
        if self._needs_grad():
            return compute()
        with torch.no_grad():
            return compute()

    def _log_abs_det_of_factors(self, factors: Any, event_shape: Shape) -> Tensor:
        r""":math:`\sum_i \log|U_{ii}|` of the LU factorisation ``factors[0]`` (batched LUs: summed
        over the batch too); override when the factors describe a block repeated in the map."""
        lu = factors[0]
        return torch.log(lu.diagonal(dim1=-2, dim2=-1).abs()).sum()

    def _compute_log_abs_det(self, event_shape: Shape) -> Tensor:
        """The one gradient-vs-cache decision: differentiable :meth:`_log_abs_det` when gradients
        are needed, else (with :attr:`logdet_from_factors`) the cached factors' determinant."""
        if self.logdet_from_factors and not self._needs_grad():
            factors = self._cached("factors", event_shape, lambda: self._factorize(event_shape))
            return self._log_abs_det_of_factors(factors, event_shape)
        return self._log_abs_det(event_shape)

    def clear_cache(self) -> None:
        """Forget the cached log-determinant and factorisation."""
        self._cache.clear()

    # -- public API -----------------------------------------------------------------------
    def log_abs_det(self, event_shape: Shape) -> Tensor:
        """``log|det A|`` (a scalar) for inputs of event shape ``event_shape``; cached. Raises
        :class:`~ebflow.errors.SingularLayerError` when it is not finite (checked once per
        parameter state; at every call with gradients, except inside
        :func:`unchecked_singularity`, where a training objective leaves the check to its loss)."""
        shape = tuple(event_shape)
        if self._needs_grad():
            value = self._cached("logdet", shape, lambda: self._compute_log_abs_det(shape))
            return value if _SINGULARITY_UNCHECKED.get() else self._finite_log_abs_det(value)
        # checked once, when computed; served from the cache without reading the device again
        return self._cached(
            "logdet", shape, lambda: self._finite_log_abs_det(self._compute_log_abs_det(shape))
        )

    def _finite_log_abs_det(self, value: Tensor) -> Tensor:
        if not bool(torch.isfinite(value)):
            raise SingularLayerError(
                f"{type(self).__name__}: weight matrix is singular (log|det| = {float(value.detach())})"
            )
        return value

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(transform(x), log|det A|)``: the constant log-determinant (cached) repeated for each
        example."""
        y = self.transform(x)
        logdet = self.log_abs_det(tuple(x.shape[1:]))
        return y, logdet.to(device=y.device, dtype=y.dtype).expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        """``A^{-1}(y - b)`` from the cached factorisation (e.g. an LU solve); raises
        :class:`~ebflow.errors.SingularLayerError` when ``A`` is numerically singular."""
        event_shape = self.input_shape_of(tuple(y.shape[1:]))
        factors = self._cached("factors", event_shape, lambda: self._factorize(event_shape))
        return self._inverse_with(factors, y)

    def input_shape_of(self, output_event_shape: Shape) -> Shape:
        """Event shape of the input that gives ``output_event_shape`` (same by default)."""
        return tuple(output_event_shape)


if TYPE_CHECKING:

    class FlowLayerList(nn.ModuleList):
        """What type checkers see of a flow's ``layers``: an ``nn.ModuleList`` of FlowLayers."""

        def __iter__(self) -> Iterator[FlowLayer]: ...
        @overload
        def __getitem__(self, idx: slice) -> FlowLayerList: ...
        @overload
        def __getitem__(self, idx: int) -> FlowLayer: ...
        def __getitem__(self, idx: int | slice) -> FlowLayer | FlowLayerList: ...
else:
    FlowLayerList = nn.ModuleList  # at run time, a plain nn.ModuleList

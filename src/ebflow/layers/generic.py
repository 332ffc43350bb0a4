r"""Linear layers defined by their map alone.

A user writes only ``transform(x)``, an affine map :math:`f(x) = A x + b` on events of a fixed
shape (``D`` numbers each); :class:`GenericLinear` derives everything else exactly, in float64:

* the matrix, column by column, :math:`A e_j = f(e_j) - f(0)`, by applying the map to batches of
  identity basis events: ``D`` evaluations of ``f`` (in chunks), :math:`O(D^2)` memory;
* the shift :math:`b = f(0)`;
* :math:`\log|\det A|` from an LU factorisation, :math:`O(D^3)`, and the inverse
  :math:`x = A^{-1}(y - b)` by LU solves, :math:`O(D^2)` per example -- one factorisation shared
  by both, cached until a parameter changes (:mod:`ebflow.layers.cache`: sub-modules' parameters
  included, so a wrapped module's weights are tracked).

Score matching only ever calls ``transform``. The dense path is limited to ``D <= max_dim``
(default 8192: a 512 MiB float64 matrix and an LU of about 10^12 flops, tens of seconds on two
CPU cores; ``D`` of a few thousand takes seconds); a larger event raises a clear
:class:`~ebflow.errors.ConfigError` instead of running out of memory. Subclasses with a cheaper
exact structure (FFT, orthogonality) override ``_log_abs_det``, ``_factorize`` and
``_inverse_with`` and keep :meth:`GenericLinear.matrix` as a reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from .base import Example, LinearFlowLayer, Shape, checked_lu_factor, example_inputs, lu_solve, perturbed

__all__ = ["DEFAULT_MAX_DIM", "GenericLinear", "LinearMap"]

#: Largest event size ``D`` for which the dense ``D x D`` matrix is built by default.
DEFAULT_MAX_DIM = 8192

#: Relative tolerance of the construction-time check that ``transform`` is affine (float64).
_LINEARITY_RTOL = 1e-6

#: Target number of float64 entries of one chunk of basis events (32 MiB).
_CHUNK_ENTRIES = 1 << 22


class _ChecksAfterInit(type):
    """Metaclass: runs ``_after_init()`` once the whole ``__init__`` chain has finished, so that a
    subclass's parameters exist when its map is checked."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        layer = super().__call__(*args, **kwargs)
        layer._after_init()
        return layer


class _TransformCall(nn.Module):
    """``forward = layer.transform``, so that :func:`torch.func.functional_call` can evaluate the
    map with substituted (float64) parameters and buffers."""

    def __init__(self, layer: GenericLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer.transform(x)


class GenericLinear(LinearFlowLayer, metaclass=_ChecksAfterInit):
    r"""A linear layer :math:`y = A x + b` on events of shape ``event_shape``, given only its map.

    Subclasses implement :meth:`transform` (affine in ``x``, examples independent, output shape
    = input shape, reading its tensors from the module's parameters and buffers, including
    sub-modules'); :math:`A`, :math:`b`, :math:`\log|\det A|` and the inverse are derived.

    **A cheaper exact structure.** A subclass that knows its determinant and inverse sets the
    class attribute ``dense = False`` and implements ``_log_abs_det`` (differentiable),
    ``_factorize`` and ``_inverse_with`` (see :class:`~ebflow.layers.LinearFlowLayer`): it is then
    never refused for its size (``max_dim`` bounds only the reference :meth:`matrix`), and
    ``logdet_from_factors`` says whether its factors' pivots give the determinant
    (:class:`~ebflow.layers.CircularConv2d`, :class:`~ebflow.layers.DCT` are examples).

    **Precision.** Derived quantities are float64: :meth:`matrix`, the shift and the factors
    evaluate ``transform`` on float64 inputs with the layer's parameters and buffers cast to
    float64. A tensor the map uses must therefore be a parameter or buffer of the layer (or of a
    sub-module), not a tensor captured from outside, which would stay float32.

    Cost of the dense path: ``transform`` is the subclass's; :meth:`matrix` evaluates the map on
    the ``D`` basis events (in chunks); ``log|det|`` an LU of :math:`A`, :math:`O(D^3)`, once per
    parameter state (cached) or a ``slogdet`` at every call with gradients; inverse
    :math:`O(B D^2)` per call with the cached LU.

    Args:
        event_shape: shape of one input (and output) event; ``D`` is its size.
        max_dim: largest ``D`` for which the dense ``D x D`` matrix may be built (``None``: no
            limit). Checked at construction when the layer relies on the dense path.
        check: check at construction (after every subclass ``__init__``) that ``transform`` is
            affine, keeps the event shape and treats examples independently -- two evaluations of
            the map on a few random events. Raises :class:`~ebflow.errors.ConfigError`.
        basis_batch: number of basis events per evaluation of the map when building
            :math:`A` (default: chunks of about 32 MiB).
    """

    #: Whether ``log|det|`` and the inverse go through the dense matrix (False in subclasses
    #: with a cheaper exact structure; their :meth:`matrix` stays available as a reference).
    dense: ClassVar[bool] = True
    _device_anchor: Tensor  # buffer: follows .to()

    def __init__(
        self,
        event_shape: Sequence[int],
        *,
        max_dim: int | None = DEFAULT_MAX_DIM,
        check: bool = True,
        basis_batch: int | None = None,
    ) -> None:
        super().__init__()
        shape = tuple(event_shape)
        if not shape or not all(isinstance(s, int) and s >= 1 for s in shape):
            raise ConfigError(
                f"{type(self).__name__}: event_shape must be a non-empty tuple of positive "
                f"integers, got {event_shape!r}"
            )
        if max_dim is not None and (not isinstance(max_dim, int) or max_dim < 1):
            raise ConfigError(
                f"{type(self).__name__}: max_dim must be a positive integer or None, got {max_dim!r}"
            )
        if basis_batch is not None and (not isinstance(basis_batch, int) or basis_batch < 1):
            raise ConfigError(
                f"{type(self).__name__}: basis_batch must be a positive integer or None, got {basis_batch!r}"
            )
        self.event_shape: Shape = shape
        self.max_dim = max_dim
        self.check = check
        self.basis_batch = basis_batch
        # follows .to(): the layer's device even when it has no parameter or buffer of its own
        # (a LinearMap of a plain function), so the matrix, factors and shift are built there
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    @property
    def dim(self) -> int:
        """Size ``D`` of one event."""
        return math.prod(self.event_shape)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}"

    # -- the user's part ----------------------------------------------------------------------
    def transform(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``y = A x + b`` for ``x`` of shape ``(batch, *event_shape)``; no determinant."""
        raise NotImplementedError(f"{type(self).__name__} must implement transform(x)")

    # -- construction-time checks ---------------------------------------------------------------
    def _after_init(self) -> None:
        if self.dense:
            self._check_size("compute its exact log|det| and inverse")
        if self.check:
            self.check_linear()

    def _check_size(self, action: str) -> None:
        d = self.dim
        if self.max_dim is not None and d > self.max_dim:
            gib = 2 * d * d * 8 / 2**30
            raise ConfigError(
                f"{type(self).__name__}: events of shape {self.event_shape} have D = {d} "
                f"dimensions, more than max_dim = {self.max_dim}. To {action} the layer builds "
                f"the dense D x D float64 matrix (about {gib:.1f} GiB with its LU factors) and "
                f"factorises it in O(D^3); pass max_dim={d} (or None) to allow it, or use a layer "
                f"with a cheaper exact structure"
            )

    def check_linear(self, seed: int = 0) -> None:
        r"""Raise :class:`~ebflow.errors.ConfigError` unless, on random events :math:`a, c` and a
        scalar :math:`s`, the map keeps the event shape, treats examples independently, and
        :math:`f(a + c) + f(0) = f(a) + f(c)`, :math:`f(s a) - f(0) = s (f(a) - f(0))` (affine)
        to a relative 1e-6 in float64. Cost: two evaluations of ``transform`` (6 events)."""
        name = type(self).__name__
        g = torch.Generator().manual_seed(seed)
        a, c = (torch.randn((1, *self.event_shape), generator=g, dtype=torch.float64) for _ in range(2))
        s = -1.7
        probes = torch.cat([a, c, a + c, s * a, torch.zeros_like(a)]).to(self._device())
        try:
            with torch.no_grad():
                out = self._transform64(probes)
                alone = self._transform64(probes[:1])
        except ConfigError:
            raise
        except Exception as err:  # any failure of the user's map means one thing
            raise ConfigError(
                f"{name}: transform failed on a batch of events of shape {self.event_shape}: "
                f"{type(err).__name__}: {err}"
            ) from err
        if not isinstance(out, Tensor) or tuple(out.shape) != tuple(probes.shape):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ConfigError(
                f"{name}: transform must map a batch of shape {tuple(probes.shape)} to the same "
                f"shape (a square linear map keeps the event shape), got {got}"
            )
        f_a, f_c, f_ac, f_sa, f_0 = out
        scale = float(out.abs().max().clamp_min(1e-30))
        errors = {
            "the map is not affine: f(a + c) != f(a) + f(c) - f(0)": f_ac + f_0 - f_a - f_c,
            "the map is not affine: f(s a) - f(0) != s (f(a) - f(0))": f_sa - f_0 - s * (f_a - f_0),
            "examples are not independent: f(a) depends on the other events of the batch": alone[0] - f_a,
        }
        for problem, residual in errors.items():
            rel = float(residual.abs().max()) / scale
            if not rel <= _LINEARITY_RTOL:  # also catches NaN
                raise ConfigError(
                    f"{name}: {problem} on random inputs (relative error {rel:.2e}). transform(x) "
                    f"must be y = A x + b for a fixed matrix A and shift b; pass check=False to "
                    f"skip this check"
                )

    # -- the derived matrix ---------------------------------------------------------------------
    def _device(self) -> torch.device:
        return self._device_anchor.device

    def _transform64(self, x: Tensor) -> Tensor:
        """``transform(x)`` with every floating parameter and buffer cast to float64
        (differentiable in the originals), so that derived quantities are float64-exact."""
        call = _TransformCall(self)
        tensors = {
            name: t.double()
            for name, t in chain(call.named_parameters(), call.named_buffers())
            if t.is_floating_point()
        }
        try:
            return torch.func.functional_call(call, tensors, (x.double(),))
        except RuntimeError as err:
            if "dtype" not in str(err) and "Double" not in str(err):
                raise
            raise ConfigError(
                f"{type(self).__name__}: transform failed on float64 inputs ({str(err).splitlines()[0][:300]}). "
                "ebflow builds the matrix, shift and factors in float64 and casts the layer's "
                "parameters and buffers for it; a tensor captured from outside the layer stays in "
                "its dtype. Register it (self.register_buffer('name', t) or a LinearMap of an "
                "nn.Module holding it), or cast it inside the map: t.to(x.dtype)"
            ) from err

    def shift(self) -> Tensor:
        """:math:`b = f(0)`, shape ``event_shape``, float64. Cost: one evaluation of the map."""
        zero = torch.zeros((1, *self.event_shape), dtype=torch.float64, device=self._device())
        return self._transform64(zero)[0]

    def matrix(self) -> Tensor:
        r"""The ``D x D`` float64 matrix :math:`A` (events flattened in C order), with
        :math:`A e_j = f(e_j) - f(0)`; differentiable in the parameters. Cost: ``D`` basis events
        through the map in chunks of ``basis_batch``, :math:`O(D^2)` memory. Raises
        :class:`~ebflow.errors.ConfigError` when ``D > max_dim``."""
        self._check_size("build")
        d, device = self.dim, self._device()
        chunk = self.basis_batch or max(1, min(d, _CHUNK_ENTRIES // d))
        zero = self.shift().reshape(1, d)
        rows = []
        for start in range(0, d, chunk):
            n = min(chunk, d - start)
            basis = torch.zeros(n, d, dtype=torch.float64, device=device)
            basis[torch.arange(n, device=device), torch.arange(start, start + n, device=device)] = 1.0
            rows.append(self._transform64(basis.view(n, *self.event_shape)).reshape(n, d) - zero)
        return torch.cat(rows).T  # row j of the stack is A e_j, i.e. column j of A

    def dense_log_abs_det(self) -> Tensor:
        r""":math:`\log|\det A|` from the dense matrix, uncached (the reference for subclasses
        with a cheaper structure). Cost: :math:`O(D^3)`."""
        return torch.linalg.slogdet(self.matrix())[1]

    def dense_inverse(self, y: Tensor) -> Tensor:
        r""":math:`A^{-1}(y - b)` by an LU solve of the dense matrix, uncached (the reference for
        subclasses with a cheaper structure). Cost: :math:`O(D^3 + D^2 B)`."""
        return self._solve(checked_lu_factor(self.matrix(), type(self).__name__), y)

    # -- shapes -----------------------------------------------------------------------------------
    def output_shape(self, event_shape: Shape) -> Shape:
        if tuple(event_shape) != self.event_shape:
            raise InputError(
                f"{type(self).__name__} was built for events of shape {self.event_shape}, "
                f"got event shape {tuple(event_shape)}"
            )
        return self.event_shape

    def input_shape_of(self, output_event_shape: Shape) -> Shape:
        return self.output_shape(output_event_shape)

    # -- LinearFlowLayer hooks (the dense path) ----------------------------------------------------
    @property
    def logdet_from_factors(self) -> bool:  # type: ignore[override]
        """The dense path reads ``log|det A|`` off the cached LU of :meth:`matrix`; a subclass with
        ``dense = False`` supplies its own :meth:`_log_abs_det` (set the attribute to True if its
        :meth:`_factorize` returns an LU whose pivots give the determinant)."""
        return type(self).dense

    def _log_abs_det(self, event_shape: Shape) -> Tensor:
        return self.dense_log_abs_det()

    def _factorize(self, event_shape: Shape) -> tuple[Tensor, Tensor]:
        return checked_lu_factor(self.matrix(), type(self).__name__)

    def _inverse_with(self, factors: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
        return self._solve(factors, y)

    def _solve(self, factors: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
        self._check_event_shape(y, self.event_shape, "outputs")
        lu, pivots = factors
        rhs = (y.double() - self.shift()).reshape(y.shape[0], -1).T
        return lu_solve(lu, pivots, rhs).T.reshape(y.shape).to(y.dtype)


#: Modules whose output depends on train/eval mode (and, in train mode, on the other examples
#: of the batch or on randomness): not a fixed linear map.
_MODE_DEPENDENT = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.dropout._DropoutNd,
    nn.Dropout,
    nn.AlphaDropout,
)


def _refuse_mode_dependent(module: nn.Module) -> None:
    """:class:`ConfigError` for a module that holds a layer with train/eval behaviour."""
    for name, sub in module.named_modules():
        if isinstance(sub, _MODE_DEPENDENT):
            where = f" (sub-module {name!r})" if name else ""
            raise ConfigError(
                f"LinearMap: {type(sub).__name__}{where} behaves differently in train and eval mode "
                "(batch statistics or random masks in training), so it is not one fixed linear map "
                "y = A x + b and its density would not be exact. Use ebflow.layers.ActNorm for a "
                "learned per-channel affine map, or call the module in eval mode inside your own "
                "function and register its tensors as buffers"
            )


class LinearMap(GenericLinear):
    r"""Wrap a linear function or module ``fn`` as a flow layer: :math:`y = f(x) + b`.

    ``fn`` maps ``(batch, *event_shape)`` to the same shape and must be affine; an
    :class:`~torch.nn.Module` is registered as a sub-module (its parameters are trained and
    tracked by the cache); a plain function must not read tensors that can change.

    >>> layer = LinearMap(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), (1, 8, 8))

    Cost: ``transform`` is one call of ``fn``; ``log|det|`` and the inverse as in
    :class:`GenericLinear`.
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor] | nn.Module,
        event_shape: Sequence[int],
        *,
        bias: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(event_shape, **options)
        if not callable(fn):
            raise ConfigError(f"LinearMap needs a callable or a torch module, got {type(fn).__name__}")
        if isinstance(fn, nn.Module):
            _refuse_mode_dependent(fn)
        self.fn = fn
        self.bias = nn.Parameter(torch.zeros(self.event_shape)) if bias else None

    @classmethod
    def examples(cls) -> list[Example]:
        conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
        return [
            (perturbed(cls(conv, (2, 4, 4), bias=True)), example_inputs(4, 2, 4, 4)),
            (cls(lambda x: 2.0 * x.flip(-1) - x, (3,)).double(), example_inputs(4, 3)),
        ]

    def extra_repr(self) -> str:
        fn = "" if isinstance(self.fn, nn.Module) else f", fn={getattr(self.fn, '__name__', self.fn)!s}"
        return f"event_shape={self.event_shape}, bias={self.bias is not None}{fn}"

    def transform(self, x: Tensor) -> Tensor:
        y = self.fn(x)
        return y if self.bias is None else y + self.bias

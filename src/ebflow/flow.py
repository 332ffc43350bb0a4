r"""The energy-based normalizing flow.

A flow :math:`g = g_L \circ \dots \circ g_1` with prior :math:`p_u` defines

.. math::
    E(x) = -\log p_u(g(x)) - \sum_{l \in S_{nl}} \log|\det J_{g_l}|, \qquad
    \log Z = -\sum_{l \in S_{lin}} \log|\det J_{g_l}|, \qquad
    \log p(x) = -E(x) - \log Z.

The energy and the score never touch a linear layer's determinant; ``log Z`` is cached by the
layers and recomputed only after a parameter changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, cast

import torch
from torch import Tensor, nn

from .errors import ConfigError, InputError
from .layers.base import FlowLayer, FlowLayerList, LinearFlowLayer, Shape
from .linear_prefix import push_point_and_direction
from .prior import PriorLike, StandardNormal
from .runtime import full_precision
from .utils import grad_ready
from .validation import check_batch, check_generator, check_sample_shape, common_dtype

__all__ = ["EBFlow", "EnergyKernels"]


class EnergyKernels(Protocol):
    """Replacements (:func:`ebflow.compile_model`'s compiled ones) of the tail energy
    :math:`E(h)` of :meth:`EBFlow.tail_energy` and of its derivatives in ``h``: ``(E, dE/dh)`` and
    ``(E, dE/dh, d2E/dh2 u)``, each differentiable once more. Off while ``enabled`` is False."""

    enabled: bool

    def energy(self, model: EBFlow, h: Tensor) -> Tensor: ...
    def energy_and_grad(self, model: EBFlow, h: Tensor) -> tuple[Tensor, Tensor]: ...
    def energy_grad_hvp(self, model: EBFlow, h: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...


class EBFlow(nn.Module):
    """Energy-based normalizing flow over events of shape ``event_shape``.

    Args:
        layers: the bijections, applied in order from data to latent.
        event_shape: shape of one example, e.g. ``(2,)`` or ``(1, 28, 28)``.
        prior: latent distribution (default: :class:`~ebflow.prior.StandardNormal`).
        validate: check every input's shape, dtype, device and finiteness (a clear
            :class:`~ebflow.errors.InputError` instead of a wrong answer). Costs one reduction.

    Example:
        >>> import torch
        >>> from ebflow import EBFlow
        >>> from ebflow.layers import Dense, SmoothLeakyReLU
        >>> model = EBFlow([Dense(4), SmoothLeakyReLU(0.3), Dense(4)], event_shape=(4,))
        >>> x = torch.randn(8, 4)
        >>> model.log_prob(x).shape
        torch.Size([8])
        >>> torch.allclose(model.log_prob(x), -model.energy(x) - model.log_partition())
        True
        >>> model.sample(3).shape  # exact samples, by inverting the layers
        torch.Size([3, 4])
    """

    _anchor: Tensor  # buffer: the model's dtype and device
    #: compiled energy kernels (:func:`ebflow.compile_model`); None: eager
    kernels: EnergyKernels | None = None

    def __init__(
        self,
        layers: Iterable[FlowLayer],
        event_shape: Sequence[int],
        prior: nn.Module | None = None,
        *,
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.layers = FlowLayerList(layers)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, FlowLayer):
                raise ConfigError(
                    f"layer {i} ({type(layer).__name__}) is not an ebflow FlowLayer; wrap it or "
                    "use one of ebflow.layers"
                )
        self.event_shape: Shape = tuple(int(s) for s in event_shape)
        shapes = [self.event_shape]
        for i, layer in enumerate(self.layers):
            try:
                shapes.append(tuple(layer.output_shape(shapes[-1])))
            except InputError as err:
                raise ConfigError(f"layer {i} ({type(layer).__name__}): {err}") from err
        self.layer_input_shapes: list[Shape] = shapes[:-1]
        self.latent_shape: Shape = shapes[-1]
        self.prior = prior if prior is not None else StandardNormal()
        self.validate = validate
        # A buffer that follows .to(): tells the model's dtype and device (the layers' dtype).
        self.register_buffer("_anchor", torch.zeros((), dtype=common_dtype(self.layers)), persistent=False)

    # -- properties -------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the model's parameters and buffers (inputs must have it)."""
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters and buffers (inputs must be on it)."""
        return self._anchor.device

    @property
    def dim(self) -> int:
        """Number of dimensions ``D`` of one example."""
        return math.prod(self.event_shape)

    @property
    def linear_layers(self) -> list[LinearFlowLayer]:
        """The constant-Jacobian layers (the set S_lin), whose log-determinants make up ``log Z``."""
        return [l for l in self.layers if isinstance(l, LinearFlowLayer)]

    def check_input(self, x: Tensor, what: str = "input x", shape: Shape | None = None) -> Tensor:
        """Every public entry point's input check (:func:`~ebflow.validation.check_batch`: type,
        floating dtype = the model's, device, shape -- ``event_shape`` unless ``shape`` is given
        -- and finiteness; :class:`~ebflow.errors.InputError` naming ``what``); skipped with
        ``validate=False``. Returns ``x``. An objective checks its batch once with it, then calls
        the model's methods with ``check=False``."""
        if self.validate:
            check_batch(
                x,
                self.event_shape if shape is None else shape,
                dtype=self.dtype,
                device=self.device,
                what=what,
            )
        return x

    # -- data-dependent initialisation -----------------------------------------------------------
    @property
    def requires_initialization(self) -> bool:
        """True while some layer (e.g. :class:`~ebflow.layers.ActNorm`) still needs its
        data-dependent initialisation: call :meth:`initialize` (or load a state dict)."""
        return any(layer.requires_initialization for layer in self.layers)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> EBFlow:
        """Data-dependent initialisation: push the batch ``x`` through the layers in order and
        call :meth:`~ebflow.layers.FlowLayer.initialize` on each with its input (ActNorm
        standardises its output on ``x``; other layers ignore it). Re-initialises layers that
        were initialised before. Call it once, before training or evaluating, with a batch of
        clean data (at least two examples); every objective then starts from the same model.
        Returns the model."""
        h = self.check_input(x, "initialization batch x")
        with_init = [
            i for i, layer in enumerate(self.layers) if type(layer).initialize is not FlowLayer.initialize
        ]
        for layer in self.layers[: max(with_init, default=-1) + 1]:
            layer.initialize(h)
            h = layer.transform(h) if isinstance(layer, LinearFlowLayer) else layer(h)[0]
        return self

    # -- energy and score ---------------------------------------------------------------------
    def energy(self, x: Tensor, *, check: bool = True) -> Tensor:
        r"""Energy :math:`E(x) = -\log p_u(g(x)) - \sum_{S_{nl}} \log|\det J|`, shape ``(batch,)``.
        ``check=False`` skips the input check (for a batch already checked by
        :meth:`check_input`)."""
        x = self.check_input(x, "input x") if check else x
        k = self.active_kernels
        return self._energy_from(0, x) if k is None else k.energy(self, self._through_prefix(x))

    @property
    def active_kernels(self) -> EnergyKernels | None:
        """:attr:`kernels` where they apply: installed, enabled, with gradients on (training;
        evaluation and sampling run eagerly) and outside ``torch.func`` transforms; else None."""
        k = self.kernels
        on = k is not None and k.enabled and torch.is_grad_enabled()
        return k if on and torch._C._functorch.maybe_current_level() is None else None

    def _energy_from(self, start: int, h: Tensor) -> Tensor:
        """The energy of the input of layer ``start`` given its value ``h`` there (layers before
        ``start`` must all be linear: they contribute nothing to the energy)."""
        log_det_nl = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
        for layer in self.layers[start:]:
            if isinstance(layer, LinearFlowLayer):
                h = layer.transform(h)
            else:
                h, ld = layer(h)
                log_det_nl = log_det_nl + ld
        return -cast(PriorLike, self.prior).log_prob(h) - log_det_nl

    @torch.no_grad()
    def in_domain(self, x: Tensor) -> Tensor:
        """Per-example mask (``(batch,)``, bool): True where ``x`` lies in the model's domain,
        i.e. every layer with a restricted domain (e.g. a :class:`~ebflow.layers.Logit` inside
        a model trained without MaP) accepts its input. Runs the layers up to the last such
        layer, on the rows still in the domain."""
        h = self.check_input(x, "input x")
        keep = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        restricted = [
            i for i, layer in enumerate(self.layers) if type(layer).in_domain is not FlowLayer.in_domain
        ]
        rows = torch.arange(h.shape[0], device=h.device)
        for i, layer in enumerate(self.layers[: max(restricted, default=-1) + 1]):
            ok = layer.in_domain(h)
            if ok is not None:
                keep[rows[~ok]] = False
                h, rows = h[ok], rows[ok]
            if i == max(restricted) or h.shape[0] == 0:
                break
            h = layer.transform(h) if isinstance(layer, LinearFlowLayer) else layer(h)[0]
        return keep

    # -- the leading linear layers (shared work for directional objectives) -----------------
    @property
    def linear_prefix_length(self) -> int:
        """Number of leading layers with constant Jacobian, before the first non-linear one."""
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, LinearFlowLayer):
                return i
        return len(self.layers)

    def _prefix_layers(self) -> list[LinearFlowLayer]:  # (the filter only tells the type checker)
        return [l for l in self.layers[: self.linear_prefix_length] if isinstance(l, LinearFlowLayer)]

    def linear_prefix(self, x: Tensor, direction: Tensor, *, check: bool = True) -> tuple[Tensor, Tensor]:
        r"""Push ``x`` and a direction ``v`` through the leading linear layers, an affine map
        :math:`P(x) = A x + c`: returns :math:`(P(x), A v)` with :math:`A v = P(v) - P(0)`
        (the shift cancels, so gradients reach :math:`A` only). The prefix adds nothing to the
        energy, so :math:`E(x \pm v) = ` :meth:`tail_energy` :math:`(h \pm A v)` and
        :math:`v^\top \nabla_x^2 E\, v = (Av)^\top \nabla_h^2 E\, (Av)`: directional
        objectives run the first (often the largest) layers on ``x`` and ``v`` instead of on
        every perturbed copy of ``x``. ``check=False`` skips the input checks."""
        if not check:
            return self._linear_prefix(x, direction)
        h = self.check_input(x, "input x")
        if self.validate:
            check_batch(direction, None, dtype=self.dtype, device=self.device, what="direction")
        if tuple(direction.shape) != tuple(h.shape):
            raise InputError(
                f"direction must have the shape of x {tuple(h.shape)}, got {tuple(direction.shape)}"
            )
        return self._linear_prefix(h, direction)

    def _linear_prefix(self, h: Tensor, direction: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`linear_prefix` without the input checks (callers checked)."""
        return push_point_and_direction(self._prefix_layers(), h, direction)

    def tail_energy(self, h: Tensor, *, check: bool = True) -> Tensor:
        """:math:`E(x)` from ``h``, the output of :meth:`linear_prefix` (same value as
        :meth:`energy` of ``x``), shape ``(batch,)``. ``check=False`` skips the input check."""
        if check:
            start = self.linear_prefix_length
            shape = self.layer_input_shapes[start] if start < len(self.layers) else self.latent_shape
            self.check_input(h, "prefix output h", shape)
        return self._tail_energy(h)

    def _tail_energy(self, h: Tensor) -> Tensor:
        """:meth:`tail_energy` without the input check."""
        k = self.active_kernels
        return self._energy_from(self.linear_prefix_length, h) if k is None else k.energy(self, h)

    def score(self, x: Tensor, *, create_graph: bool = False) -> Tensor:
        r"""Score :math:`\nabla_x \log p(x) = -\nabla_x E(x)` (no partition function needed).

        With ``create_graph=True`` the score is differentiable in the parameters (and in ``x``
        when ``x`` requires grad). For an ``x`` that does not require grad, its graph then reaches
        the parameters only (:meth:`energy_and_grad`), so a plain ``.backward()`` of a loss
        built on it computes nothing but their gradients."""
        x = self.check_input(x, "input x")
        if create_graph and not x.requires_grad:
            return -self._energy_and_grad(x)[1]
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            e = self.energy(x).sum()
            (grad,) = torch.autograd.grad(e, x, create_graph=create_graph)
        return -grad

    def energy_and_grad(self, x: Tensor, *, check: bool = True) -> tuple[Tensor, Tensor]:
        r"""``(E(x), \nabla_x E(x))``, both differentiable in the parameters (score matching):
        the values of ``torch.autograd.grad(E(x).sum(), x, create_graph=True)`` on a leaf copy of
        ``x``, but ``x`` never becomes an autograd leaf, so the graph reaches the parameters only
        and a plain ``loss.backward()`` does no work beyond their gradients (no input gradient of
        the first layer, nothing accumulated into a copy of the data). ``x`` itself is detached.

        How: the leading linear layers :math:`h = Ax + c` run under :func:`torch.func.vjp`, which
        also gives the pull-back :math:`g_h \mapsto A^\top g_h`; the rest of the energy is
        differentiated by autograd with respect to :math:`h`, a non-leaf that depends on the
        parameters only (``torch.func``'s per-op dispatch cost stays off the many small ops of
        coupling layers). A model without a linear prefix is differentiated by
        :func:`torch.func.grad` alone. ``check=False`` skips the input check."""
        return self._energy_and_grad(self.check_input(x, "input x") if check else x)

    def _energy_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`energy_and_grad` without the input check."""
        x, k = x.detach(), self.active_kernels
        with torch.enable_grad():
            if self.linear_prefix_length == 0:
                if k is not None:
                    return k.energy_and_grad(self, x)

                def energy_sum(v: Tensor) -> tuple[Tensor, Tensor]:
                    e = self._energy_from(0, v)
                    return e.sum(), e

                g, e = torch.func.grad(energy_sum, has_aux=True)(x)
                return e, g
            vjp = torch.func.vjp(self._through_prefix, x)  # annotated as a union with has_aux's triple
            h, to_x = cast("tuple[Tensor, Callable[[Tensor], tuple[Tensor]]]", vjp)
            if k is not None:
                e, g_h = k.energy_and_grad(self, h)
                return e, to_x(g_h)[0]
            h = grad_ready(h)
            e = self._tail_energy(h)
            (g_h,) = torch.autograd.grad(e.sum(), h, create_graph=True)
            return e, to_x(g_h)[0]

    def _through_prefix(self, x: Tensor) -> Tensor:
        for layer in self._prefix_layers():
            x = layer.transform(x)
        return x

    # -- exact likelihood ---------------------------------------------------------------------
    def log_partition(self) -> Tensor:
        r""":math:`\log Z = -\sum_{l \in S_{lin}} \log|\det J_l|` (float64 scalar).

        Each layer caches its term until its parameters change, so repeated calls are free.
        Differentiable when grad mode is on (maximum likelihood training).
        """
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for layer, shape in zip(self.layers, self.layer_input_shapes, strict=True):
            if isinstance(layer, LinearFlowLayer):
                total = total - layer.log_abs_det(shape).to(device=self.device, dtype=torch.float64)
        return total

    @full_precision()
    @torch.nn.utils.parametrize.cached()  # one value per parametrized weight (spectral norm)
    def log_prob(self, x: Tensor) -> Tensor:
        r"""Exact log-density :math:`\log p(x) = -E(x) - \log Z`, shape ``(batch,)`` (TF32 off:
        :func:`~ebflow.runtime.full_precision`)."""
        e = self.energy(x)
        return -e - self.log_partition().to(e.dtype)

    @full_precision()
    @torch.nn.utils.parametrize.cached()  # one value per parametrized weight (spectral norm)
    def forward_with_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, sum of every layer's log|det J|)``: plain change of variables (for checks)."""
        h = self.check_input(x, "input x")
        total = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
        for layer in self.layers:
            h, ld = layer(h)
            total = total + ld
        return h, total

    # -- mapping and sampling -----------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Latent ``z = g(x)``."""
        h = self.check_input(x, "input x")
        for layer in self.layers:
            h = layer.transform(h) if isinstance(layer, LinearFlowLayer) else layer(h)[0]
        return h

    @full_precision()
    def inverse(self, z: Tensor) -> Tensor:
        """Data ``x = g^{-1}(z)`` by exact inversion of every layer (TF32 off)."""
        h = self.check_input(z, "latent z", self.latent_shape)
        for layer in reversed(self.layers):
            h = layer.inverse(h)
        return h

    @torch.no_grad()
    def sample(
        self, sample_shape: int | Sequence[int] = (), *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Exact samples: ``z ~ p_u``, ``x = g^{-1}(z)``, of shape ``(*sample_shape, *event_shape)``
        (an ``int n`` means ``(n,)``; ``()`` one sample without a batch dimension, as
        ``torch.distributions`` does). No gradient flows."""
        shape = check_sample_shape(sample_shape)
        check_generator(generator, device=self.device)
        n = math.prod(shape)
        z = cast(PriorLike, self.prior).sample(
            (n, *self.latent_shape), dtype=self.dtype, device=self.device, generator=generator
        )
        return self.inverse(z).reshape(*shape, *self.event_shape)

    @torch.no_grad()
    def sample_and_log_prob(
        self, sample_shape: int | Sequence[int] = (), *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`sample` and the exact :meth:`log_prob` of each sample, shapes
        ``(*sample_shape, *event_shape)`` and ``sample_shape``."""
        x = self.sample(sample_shape, generator=generator)
        shape = x.shape[: x.dim() - len(self.event_shape)]
        flat = x.reshape(-1, *self.event_shape)
        return x, self.log_prob(flat).reshape(shape)
